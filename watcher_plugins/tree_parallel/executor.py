"""TreeParallelExecutor: the ``tree_parallel`` executor. Plans the workers from the params and the
run context, keeps one TreeTrialPool for the executor's life, and turns batches into fold results."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from watcher_plugins.data import EMBEDDED_DEFAULT_ROWS, embedded_survivors
from watcher_plugins.devices import affinity_cores, available_cores, available_memory
from watcher_plugins.errors import DataError, ExecutorError
from watcher_plugins.executor import Executor, ResultCallback, RunContext
from watcher_plugins.records import STATUS_FAIL, FoldResult, RefitJob, RefitResult, TrialJob
from watcher_plugins.settings import ExecutorSettings
from watcher_plugins.tree_parallel.libraries import TREE_MODEL_TYPES
from watcher_plugins.tree_parallel.placement import (
    WorkerPlacement,
    auto_gpu_worker_cores,
    plan_placements,
    worker_memory_bytes,
)
from watcher_plugins.tree_parallel.pool import PoolSettings, TreeTrialPool

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TreeParallelSettings(ExecutorSettings):
    """tree_parallel's params (schemas/tree_parallel.params.schema.json states their defaults)."""

    schema_ref: ClassVar[str] = "watcher_plugins.schemas:tree_parallel.params.schema.json"
    tree_parallel_workers: int | str
    xgboost_per_gpu: int
    catboost_gpu_ram_part: float | str
    xgboost_gpu_fold_threads: int | str
    tree_gpu_worker_cores: int | str
    xgboost_gpu_async_pool: bool
    tree_device: str
    tree_rounds: int
    tree_trial_timeout_s: float
    tree_early_stopping_rounds: int

# xgboost_gpu_fold_threads "auto" with more than one worker: the folds of a 5-fold trial all at once
# (on an H200 10 threads were slower than 5: bench/results/2026-11-29-xgboost-fold-threads-h200/).
AUTO_XGBOOST_GPU_FOLD_THREADS = 5
# "auto" plans workers into this share of the host memory available; the rest is for the host process
# (its own copy of the data, the studies), an NN worker, and the page cache.
MEMORY_SHARE = 0.8


class TreeParallelExecutor(Executor):
    """CatBoost / LightGBM / XGBoost trials in parallel worker processes pinned to GPUs or CPU cores.

    ``tree_parallel_workers`` trials run at once (1 = serial: one worker with every core and the
    first GPU; "auto": the GPU workers, then a one-core CPU worker for every core they leave); up to
    ``xgboost_per_gpu`` of them are workers on each GPU, where XGBoost trials share the GPU and
    CatBoost trials have it to themselves. A GPU worker trains up to
    ``xgboost_gpu_fold_threads`` folds of an XGBoost trial at once (auto: 1 when serial, else 5) and
    gets at least ``tree_gpu_worker_cores`` cores for them (auto: one per fold thread plus one, at most
    half the cores). GPU XGBoost allocates from CUDA's stream-ordered pool unless
    ``xgboost_gpu_async_pool`` is false. One batch may mix model types; results never depend on any of
    these.
    """

    def __init__(self, params: Mapping[str, Any], context: RunContext):
        super().__init__(params, context)
        self.options = options = TreeParallelSettings.from_params(params)
        device = options.tree_device
        if device == "gpu" and not context.devices:
            raise ExecutorError("tree_device is 'gpu' but the run has no GPU (devices is empty)")
        gpus = list(context.devices) if device != "cpu" else []
        asked_workers = _count_or_auto(options.tree_parallel_workers)
        per_gpu = options.xgboost_per_gpu
        fold_threads = _count_or_auto(options.xgboost_gpu_fold_threads)
        async_pool = options.xgboost_gpu_async_pool
        if fold_threads is None:
            fold_threads = 1 if asked_workers == 1 else AUTO_XGBOOST_GPU_FOLD_THREADS
        cores = available_cores(context.cpu_count)
        gpu_workers = len(gpus) * per_gpu if asked_workers is None else min(asked_workers, len(gpus) * per_gpu)
        asked_gpu_cores = _count_or_auto(options.tree_gpu_worker_cores)
        gpu_cores = asked_gpu_cores or auto_gpu_worker_cores(fold_threads, len(cores), gpu_workers)
        # "auto": one-core CPU workers (the most LightGBM work per core; DESIGN measured 16 one-thread
        # processes at 2.8x one 16-thread process) on every core the GPU workers leave.
        workers = asked_workers or max(1, gpu_workers + max(0, len(cores) - gpu_workers * (gpu_cores or 1)))
        if asked_workers is None:
            workers = self._workers_memory_holds(workers, gpu_workers, len(gpus))
        # Pinned unless a CPU quota cuts the cores (containers on a shared host): then the first cores of
        # the affinity are no more ours than the others, and the pools of several containers pinned there
        # would crowd onto them; the thread counts keep to the quota. (A run's own cpu_count limit pins.)
        pinned = len(available_cores()) == len(affinity_cores())
        self.placements: list[WorkerPlacement] = plan_placements(workers, gpus, cores, per_gpu, gpu_cores,
                                                                 pinned)
        if len(self.placements) == 1 and options.xgboost_gpu_fold_threads == "auto":
            fold_threads = 1  # one worker ("auto" found room for one, or a count was capped): serial, the reference
        short = [p for p in self.placements if p.gpu is not None and asked_gpu_cores and p.threads < asked_gpu_cores]
        n_cpu_workers = sum(p.gpu is None for p in self.placements)
        if short and n_cpu_workers:
            log.warning("tree_gpu_worker_cores=%d: GPU workers get %d cores, so that each of the %d CPU workers "
                        "keeps one (%d cores)", asked_gpu_cores, min(p.threads for p in short), n_cpu_workers,
                        len(cores))
        elif short:
            log.warning("tree_gpu_worker_cores=%d: GPU workers get %d cores, their share of the %d cores",
                        asked_gpu_cores, min(p.threads for p in short), len(cores))
        if asked_workers and len(self.placements) < workers:
            log.warning("tree_parallel_workers=%d capped to %d: one core per worker at least (%d cores)",
                        workers, len(self.placements), context.cpu_count)
        if asked_workers:
            self._warn_if_memory_short(bool(gpus))
        self.settings = PoolSettings(
            rounds=options.tree_rounds,
            early_stopping_rounds=options.tree_early_stopping_rounds,
            lease_dir=str(context.lease_dir) if context.lease_dir else None,
            lease_timeout_s=float(context.lease_timeout_s),
            trial_retries=int(context.trial_retries),
            trial_timeout_s=float(options.tree_trial_timeout_s),
            xgboost_per_gpu=per_gpu,
            xgboost_gpu_fold_threads=fold_threads,
            xgboost_gpu_async_pool=async_pool,
            catboost_gpu_ram_part=None if options.catboost_gpu_ram_part == "auto" else float(options.catboost_gpu_ram_part),
        )
        self._pool: TreeTrialPool | None = None
        self._pool_refusal_logged = False

    def _memory_each(self, has_gpus: bool) -> tuple[float, float] | None:
        """Host memory one GPU worker and one CPU worker hold for the run's data (None where its shape
        is not known): each keeps its own copy of the data and its per-fold datasets."""
        if self.context.data_shape is None or self.context.folds is None:
            return None
        rows, features = self.context.data_shape
        folds = self.context.folds
        return (worker_memory_bytes(rows, features, folds, lightgbm_only=False),
                worker_memory_bytes(rows, features, folds, lightgbm_only=has_gpus))

    def _workers_memory_holds(self, workers: int, gpu_workers: int, n_gpus: int) -> int:
        """``auto``'s worker count cut to what host memory holds. The workers no plan does without stay
        (one per GPU, as GPU fits differ from CPU ones; else the one serial worker), with a warning where
        even they may not fit; the GPUs' extra XGBoost workers, then the CPU workers, come as it allows."""
        each, room = self._memory_each(n_gpus > 0), available_memory()
        if each is None or room is None:
            return workers
        gpu_each, cpu_each = each
        kept = max(1, min(n_gpus, gpu_workers))
        spare = MEMORY_SHARE * room - kept * gpu_each
        if spare < 0:
            log.warning("tree_parallel_workers auto: even its %d worker(s) that no plan does without may need "
                        "about %.1f GB of host memory, more than %.0f%% of the %.1f GB available (%s)", kept,
                        kept * gpu_each / 1e9, MEMORY_SHARE * 100, room / 1e9, self._memory_basis(each, n_gpus > 0))
            return kept
        extra_gpu = min(gpu_workers - kept, int(spare // gpu_each)) if gpu_workers > kept else 0
        spare -= extra_gpu * gpu_each
        held = min(workers, kept + extra_gpu + int(spare // cpu_each))
        if held < workers:
            log.warning("tree_parallel_workers auto: %d worker(s), not %d, so that they fit in %.0f%% of the %.1f GB "
                        "of host memory available (%s)", held, workers, MEMORY_SHARE * 100, room / 1e9,
                        self._memory_basis(each, n_gpus > 0))
        return held

    def _memory_basis(self, each: tuple[float, float], has_gpus: bool) -> str:
        """What a worker's memory estimate (``each``, from _memory_each) is, for the warnings."""
        gpu_each, cpu_each = each
        rows, features = cast("tuple[int, int]", self.context.data_shape)  # set: _memory_each checked it
        sizes = (f"about {gpu_each / 1e9:.1f} GB a GPU worker, {cpu_each / 1e9:.1f} GB a CPU worker" if has_gpus
                 else f"about {cpu_each / 1e9:.1f} GB each")
        return f"each worker holds its copy of the data, {rows} rows x {features} features, and per-fold datasets: {sizes}"

    def _warn_if_memory_short(self, has_gpus: bool) -> None:
        """An explicit worker count is the operator's to choose; say when several may outgrow host memory."""
        each, room = self._memory_each(has_gpus), available_memory()
        if each is None or room is None or len(self.placements) < 2:
            return
        need = sum(each[0] if p.gpu is not None else each[1] for p in self.placements)
        if need > MEMORY_SHARE * room:
            log.warning("tree_parallel_workers=%d: the workers may need about %.1f GB of host memory, more than "
                        "%.0f%% of the %.1f GB available (%s); \"auto\" plans as many as it holds",
                        len(self.placements), need / 1e9, MEMORY_SHARE * 100, room / 1e9,
                        self._memory_basis(each, has_gpus))

    @classmethod
    def check(cls, params: Mapping[str, Any], context: RunContext) -> None:
        # Plans the workers and checks every param (the pool starts on first use only); quietly: the
        # executor made for the run logs its warnings once.
        disabled, log.disabled = log.disabled, True
        try:
            cls(params, context)
        finally:
            log.disabled = disabled

    @property
    def pool(self) -> TreeTrialPool:
        """The worker pool, started on first use and kept until close()."""
        if self._pool is None:
            self._pool = TreeTrialPool(self.placements, self.settings)
        return self._pool

    def run_batch(self, jobs: Sequence[TrialJob], on_result: ResultCallback | None = None) -> list[FoldResult]:
        known = [job for job in jobs if job.model_type in TREE_MODEL_TYPES]
        results: dict[int, list[FoldResult]] = {}
        for i, job in enumerate(jobs):
            if job.model_type not in TREE_MODEL_TYPES:
                results[i] = [FoldResult(job.trial_number, k, job.model_type, None, 0.0, STATUS_FAIL,
                                         error=f"tree_parallel cannot train model type {job.model_type!r}: "
                                               f"expected one of {', '.join(TREE_MODEL_TYPES)}")
                              for k in range(job.folds)]
                if on_result is not None:
                    for r in results[i]:
                        on_result(r)
        self._generate_embedded(known)
        trained = iter(self.pool.run(known, on_result) if known else [])
        out: list[FoldResult] = []
        for i, job in enumerate(jobs):
            out.extend(results[i] if i in results else [next(trained) for _ in range(job.folds)])
        self._warn_if_pool_refused(out)
        return out

    @staticmethod
    def _generate_embedded(jobs: Sequence[TrialJob]) -> None:
        """Generate the embedded data once here, not in every worker at the same moment."""
        for rows in sorted({job.data.rows or EMBEDDED_DEFAULT_ROWS for job in jobs if job.data.embedded}):
            try:
                embedded_survivors(rows)
            except DataError:
                pass  # each of its folds fails in the worker with this message

    def refit(self, jobs: Sequence[RefitJob]) -> list[RefitResult]:
        """Refit each job's trial in the pool's workers, as its trials ran (refits.py): a GPU model type on
        a GPU worker while the pool holds that GPU's lease, so the refit's folds are the study's very fits
        and no GPU is used without its lease; LightGBM on a CPU worker. Each refit trains the trial's folds
        again (their held-out predictions are the result's ``oof``, their scores the study's fold scores),
        then one model on every row for the rounded mean of the folds' best iterations, without early
        stopping, saved in the job's model_dir in the library's own format with tree_model.json (saved.py);
        the result's ``predictions`` are that saved model's, of every row on the CPU, which
        saved.predict(model_dir, X) gives again."""
        known = [job for job in jobs if job.trial.model_type in TREE_MODEL_TYPES]
        self._generate_embedded([job.trial for job in known])
        try:
            refit = iter(self.pool.refit(known) if known else [])
        except ExecutorError as exc:  # no worker could start: every refit fails, with the reason
            refit = iter([RefitResult(job.trial.model_type, job.trial.trial_number, STATUS_FAIL, error=str(exc))
                          for job in known])
        return [next(refit) if job.trial.model_type in TREE_MODEL_TYPES else
                RefitResult(job.trial.model_type, job.trial.trial_number, STATUS_FAIL,
                            error=f"tree_parallel cannot refit model type {job.trial.model_type!r}: "
                                  f"expected one of {', '.join(TREE_MODEL_TYPES)}")
                for job in jobs]

    def _warn_if_pool_refused(self, results: list[FoldResult]) -> None:
        """Once per executor: CUDA refused XGBoost its stream-ordered pool, so the fits used cudaMalloc."""
        refused = next((r.info["xgboost_async_pool_error"] for r in results
                        if r.status == "ok" and "xgboost_async_pool_error" in r.info), None)
        if refused and not self._pool_refusal_logged:
            self._pool_refusal_logged = True
            log.warning("xgboost_gpu_async_pool: CUDA refused XGBoost its stream-ordered memory pool (%s); GPU "
                        "XGBoost trains with cudaMalloc: same results, folds at once slower", refused)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _count_or_auto(value: int | str) -> int | None:
    """An "auto"-or-integer setting as the executor takes it: None for "auto" (the schema checked the rest)."""
    return None if value == "auto" else int(value)
