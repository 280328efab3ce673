"""One tree trial: k-fold CV of one job (early stopping on each held-out fold, the job's metric of the
held-out predictions at the best iteration), the per-process cache of fold datasets, a refit (run_refit:
the trial's folds again for their held-out predictions, then one fit on every row, saved), and a command
that runs one trial pinned to one GPU or to the CPU and prints its result as JSON:

    python -m watcher_plugins.tree_parallel.trial --gpu 0 --model catboost --trial 0
    python -m watcher_plugins.tree_parallel.trial --cpu --model lightgbm --trial 3 --rows 20000

Without --params the trial's params are drawn from the model's search space by a seeded sampler, so
a (seed, trial) pair always names the same params.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import cast

import numpy as np

from watcher_plugins.data import Dataset, kfold_splits, load_dataset
from watcher_plugins.devices import available_cores, pin_environment
from watcher_plugins.errors import WatcherPluginError
from watcher_plugins.records import (
    STATUS_FAIL,
    STATUS_OK,
    DataRef,
    FoldResult,
    RefitJob,
    RefitResult,
    TrialJob,
    fold_seed,
)
from watcher_plugins.stdio import claim_stdout
from watcher_plugins.tasks import MULTICLASS, score
from watcher_plugins.tree_parallel.encoding import TreeEncoding
from watcher_plugins.tree_parallel.libraries import (
    FOLD_THREADS_GPU_MODEL_TYPES,
    TREE_MODEL_TYPES,
    CatBoostFitter,
    FitSettings,
    FoldData,
    fitter_for,
    is_out_of_gpu_memory,
)


class FoldDataCache:
    """Datasets, fold splits and each library's per-fold datasets, built once per process.

    Trials of one study share the data, the folds and the split seed, so every trial after the first
    reuses what the first built. Only the most recent ``max_splits`` splits are kept. Safe to call from
    the threads of one trial (its folds trained at once): building is done under a lock.
    """

    def __init__(self, max_splits: int = 2):
        self.max_splits = max_splits
        self._lock = threading.Lock()
        self._datasets: dict[str, Dataset] = {}
        self._encodings: dict[str, TreeEncoding] = {}
        self._splits: OrderedDict[tuple, list] = OrderedDict()
        self._folds: dict[tuple, FoldData] = {}
        self.builds = 0  # per-fold dataset builds, for tests and logs

    def dataset(self, ref: DataRef) -> Dataset:
        if ref.key not in self._datasets:
            self._datasets[ref.key] = load_dataset(ref)
        return self._datasets[ref.key]

    def encoding(self, ref: DataRef) -> TreeEncoding:
        """How the dataset's rows reach the libraries (encoding.py), from all its rows, once."""
        if ref.key not in self._encodings:
            self._encodings[ref.key] = TreeEncoding.of(self.dataset(ref))
        return self._encodings[ref.key]

    def splits(self, job: TrialJob) -> list:
        """The job's k-fold split of its dataset, (train, held-out) row indices per fold."""
        with self._lock:
            return self._split(job)

    def _split(self, job: TrialJob) -> list:
        split_key = (job.data.key, job.folds, job.seed)
        if split_key not in self._splits:
            ds = self.dataset(job.data)
            self._splits[split_key] = kfold_splits(ds.n_rows, job.folds, job.seed)
            while len(self._splits) > self.max_splits:
                old, _ = self._splits.popitem(last=False)
                self._folds = {k: v for k, v in self._folds.items() if k[0] != old}
        self._splits.move_to_end(split_key)
        return self._splits[split_key]

    def fold(self, job: TrialJob, fold_idx: int, settings: FitSettings) -> FoldData:
        with self._lock:
            return self._fold(job, fold_idx, settings)

    def _fold(self, job: TrialJob, fold_idx: int, settings: FitSettings) -> FoldData:
        split = self._split(job)
        key = ((job.data.key, job.folds, job.seed), fold_idx, job.model_type, settings.use_gpu)
        if key not in self._folds:
            ds = self.dataset(job.data)
            train, val = split[fold_idx]
            self._folds[key] = fitter_for(job.model_type).prepare_fold(
                ds.X[train], ds.y[train], ds.X[val], ds.y[val], settings, self.encoding(job.data))
            self.builds += 1
        return self._folds[key]


def run_trial(job: TrialJob, settings: FitSettings, cache: FoldDataCache | None = None,
              fold_indices: Iterable[int] | None = None,
              on_fold: Callable[[FoldResult], None] | None = None, fold_threads: int = 1,
              held_out: dict[int, np.ndarray] | None = None) -> list[FoldResult]:
    """Train ``job`` on each fold (all, or ``fold_indices``); one FoldResult per fold, failures included,
    in fold order. ``held_out``, where given, gets each fold's held-out predictions (those it was scored
    on) by fold index.

    A fold that raises ends as status "fail" with the error text; the other folds still run. With
    ``fold_threads`` > 1 up to that many folds train at once, in threads of this process, sharing
    ``settings.threads`` between them; ``on_fold`` is still called from the calling thread, as each
    fold ends. Each fold's fit is the same computation either way (its own datasets, its own seed).
    A GPU fold that ran out of memory next to the others is trained again alone, after them, since
    one at a time it may fit: folds at once must not fail what serial would train.
    """
    cache = cache or FoldDataCache()
    indices = list(range(job.folds) if fold_indices is None else fold_indices)
    threads = max(1, min(fold_threads, len(indices)))
    done: dict[int, FoldResult] = {}

    def finish(outcome: tuple[FoldResult, np.ndarray | None]) -> None:
        result, predictions = outcome
        done[result.fold_idx] = result
        if held_out is not None and predictions is not None:
            held_out[result.fold_idx] = predictions
        if on_fold is not None:
            on_fold(result)

    if threads == 1:
        for fold_idx in indices:
            finish(_run_fold(job, fold_idx, settings, cache, concurrent_folds=1))
        return [done[fold_idx] for fold_idx in indices]
    shared = dataclasses.replace(settings, threads=max(1, settings.threads // threads))
    alone: list[int] = []  # out of GPU memory next to the other folds: trained again, one at a time
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"{job.model_type}-fold") as pool:
        futures = [pool.submit(_run_fold, job, fold_idx, shared, cache, threads, settings) for fold_idx in indices]
        try:
            for future in as_completed(futures):
                outcome = future.result()
                result = outcome[0]
                if settings.use_gpu and result.status == STATUS_FAIL and is_out_of_gpu_memory(result.error):
                    alone.append(result.fold_idx)
                else:
                    finish(outcome)
        except BaseException:
            # Ctrl-C, or on_fold failed (the parent is gone): start no more folds. Those training
            # finish first; a library call cannot be stopped from outside.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    for fold_idx in sorted(alone, key=indices.index):
        outcome = _run_fold(job, fold_idx, settings, cache, concurrent_folds=1)
        outcome[0].info["retried_alone_after"] = "out of GPU memory with other folds at once"
        finish(outcome)
    return [done[fold_idx] for fold_idx in indices]


def _run_fold(job: TrialJob, fold_idx: int, settings: FitSettings, cache: FoldDataCache,
              concurrent_folds: int, build_settings: FitSettings | None = None
              ) -> tuple[FoldResult, np.ndarray | None]:
    """One fold's fit with ``settings`` (scored by the job's metric), and its held-out predictions (None
    where it failed); its datasets, when not cached yet, are built with ``build_settings`` (every thread
    of the trial: building holds the cache's lock anyway)."""
    device = "gpu" if settings.use_gpu else "cpu"
    info = {"device": device, "threads": settings.threads, "concurrent_folds": concurrent_folds}
    started = time.perf_counter()
    try:
        fold = cache.fold(job, fold_idx, build_settings or settings)
        fit = fitter_for(job.model_type).fit(fold, dict(job.params), fold_seed(job.seed, job.trial_number, fold_idx),
                                             dataclasses.replace(settings, metric=job.metric))
        return (FoldResult(job.trial_number, fold_idx, job.model_type, fit.score, time.perf_counter() - started,
                           STATUS_OK, info={"best_iteration": fit.best_iteration, **fit.info, **info}),
                fit.predictions)
    except Exception as exc:  # noqa: BLE001 - a failing fold is a result, never a crash of the worker
        return (FoldResult(job.trial_number, fold_idx, job.model_type, None, time.perf_counter() - started,
                           STATUS_FAIL, error=f"{type(exc).__name__}: {exc}".strip(), info=info), None)


#: Where a refit in a worker leaves its out-of-fold and every-row predictions for the pool (an npz file in
#: the job's model_dir, which the pool reads and removes): a JSON line of them could be very long.
REFIT_ARRAYS = ".refit-predictions.npz"


@dataclasses.dataclass
class RefitOutput:
    """What run_refit gives: the result (its oof and predictions still empty) and those two as arrays."""

    result: RefitResult
    oof: np.ndarray | None = None
    predictions: np.ndarray | None = None

    def complete(self) -> RefitResult:
        """The result with its oof and predictions as lists (records.RefitResult)."""
        if self.oof is not None:
            self.result.oof = self.oof.tolist()
        if self.predictions is not None:
            self.result.predictions = self.predictions.tolist()
        return self.result

    def save_arrays(self, model_dir: str) -> str | None:
        """Write the arrays for the pool; the file, or None without them (a failed refit)."""
        if self.oof is None or self.predictions is None:
            return None
        path = os.path.join(model_dir, REFIT_ARRAYS)
        np.savez(path, oof=self.oof, predictions=self.predictions)
        return path


def load_refit_arrays(result: RefitResult, path: str) -> RefitResult:
    """``result`` with the oof and predictions a worker wrote to ``path`` (removed once read)."""
    with np.load(path) as arrays:
        result.oof, result.predictions = arrays["oof"].tolist(), arrays["predictions"].tolist()
    os.remove(path)
    return result


def refit_rounds(fold_info: list[dict], results: list[FoldResult]) -> tuple[int, list[int]]:
    """The fit on every row's rounds: the mean of the folds' best iterations, rounded (Python's round,
    at least 1), from the study's fold infos, or where they lack one from the refit's folds (the same fits)."""
    best = [info.get("best_iteration") for info in fold_info]
    if len(best) != len(results) or not all(isinstance(b, int) and b >= 1 for b in best):
        best = [r.info.get("best_iteration") for r in results]
    iterations = [int(cast(int, b)) for b in best]
    return max(1, round(sum(iterations) / len(iterations))), iterations


def run_refit(job: RefitJob, settings: FitSettings, cache: FoldDataCache | None = None,
              fold_threads: int = 1) -> RefitOutput:
    """Refit ``job``'s trial (records.RefitJob, RefitResult): its folds again through run_trial, the study's
    very computation, for their held-out predictions (``oof``, in row order, and each fold's score of its
    part, which is the study's fold score); then one fit on every row for refit_rounds' rounds without
    early stopping, seeded with fold_seed(seed, trial, folds) (the fold index after the last), saved in
    ``job.model_dir`` (saved.py); ``predictions`` are the saved model's, loaded back in this process, of
    every row on the CPU (what saved.predict gives for them). A failure is a result with status "fail"."""
    from watcher_plugins.tree_parallel import saved

    trial = job.trial
    started = time.perf_counter()

    def failed(error: str, **info) -> RefitOutput:
        return RefitOutput(RefitResult(trial.model_type, trial.trial_number, STATUS_FAIL,
                                       seconds=time.perf_counter() - started, error=error, info=info))

    cache = cache or FoldDataCache()
    device = "gpu" if settings.use_gpu else "cpu"
    try:
        ds, encoding = cache.dataset(trial.data), cache.encoding(trial.data)
        held_out: dict[int, np.ndarray] = {}
        results = run_trial(trial, settings, cache, fold_threads=fold_threads, held_out=held_out)
        bad = next((r for r in results if r.status != STATUS_OK), None)
        if bad is not None:
            return failed(f"fold {bad.fold_idx}: {bad.error}", device=device)
        shape = (ds.n_rows, encoding.n_classes) if encoding.task == MULTICLASS else (ds.n_rows,)
        oof = np.full(shape, np.nan, dtype=np.float64)
        splits = cache.splits(trial)
        for k, (_, val) in enumerate(splits):
            oof[val] = held_out[k]
        fold_scores: list[float | None] = [score(trial.metric, encoding.task, ds.y[val], oof[val]) for _, val in splits]
        rounds, best_iterations = refit_rounds(job.fold_info, results)
        fitter = fitter_for(trial.model_type)
        X = encoding.features(ds.X)
        fit_started = time.perf_counter()
        model = fitter.fit_all(X, encoding.target(ds.y), encoding, dict(trial.params),
                               fold_seed(trial.seed, trial.trial_number, trial.folds), rounds,
                               dataclasses.replace(settings, metric=trial.metric))
        fit_seconds = time.perf_counter() - fit_started
        trained = encoding.predictions(fitter.predict(model, X, encoding, settings.threads))
        files = saved.save(Path(job.model_dir), fitter, model, encoding, trial, rounds)
        predictions = saved.predict(Path(job.model_dir), ds.X, threads=settings.threads)
    except Exception as exc:  # noqa: BLE001 - a failing refit is a result, never a crash of the worker
        return failed(f"{type(exc).__name__}: {exc}".strip(), device=device)
    info = {"rounds": rounds, "fold_best_iterations": best_iterations, "seed": fold_seed(trial.seed, trial.trial_number,
                                                                                          trial.folds),
            "device": device, "threads": settings.threads, "fit_seconds": round(fit_seconds, 4),
            "fold_scores_match_trial": fold_scores == [r.score for r in results]}
    if not np.array_equal(trained, predictions, equal_nan=True):
        # The saved model is what predict applies: its predictions are the result's. A difference from the
        # model in memory would be the library's format losing bits: say so.
        info["trained_model_max_abs_difference"] = float(np.nanmax(np.abs(trained - predictions)))
    return RefitOutput(RefitResult(trial.model_type, trial.trial_number, STATUS_OK, fold_scores=fold_scores,
                                   files=files, seconds=time.perf_counter() - started, info=info),
                       oof, predictions)


def trial_summary(job: TrialJob, results: list[FoldResult]) -> dict:
    """The JSON the CLI prints: the mean score over the folds when every fold is ok, else the first error."""
    ok = all(r.status == STATUS_OK for r in results)
    failed = [r for r in results if r.status != STATUS_OK]
    return {
        "trial_number": job.trial_number,
        "model_type": job.model_type,
        "status": STATUS_OK if ok else STATUS_FAIL,
        "mean_score": sum(cast(float, r.score) for r in results) / len(results) if ok else None,  # ok: each has a score
        "error": None if ok else f"fold {failed[0].fold_idx}: {failed[0].error}",
        "params": job.params,
        "seconds": sum(r.seconds for r in results),
        "folds": [r.to_json() for r in results],
    }


def sample_params(model_type: str, trial_number: int, seed: int) -> dict:
    """The params a seeded random sampler gives trial ``trial_number`` of ``model_type``'s search space."""
    import optuna

    from watcher_plugins.builtin import TREES

    search_space = {declared.name: declared.search_space for declared in TREES}[model_type]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(trial_number + 1):
        trial = study.ask()
        params = search_space(trial)
    return params


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m watcher_plugins.tree_parallel.trial",
                                description="Run one tree trial pinned to one GPU (or to the CPU); print JSON.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpu", type=int, help="GPU index (as CUDA_VISIBLE_DEVICES counts); its lease is held")
    where.add_argument("--cpu", action="store_true", help="train on CPU threads only")
    p.add_argument("--model", required=True, choices=TREE_MODEL_TYPES)
    p.add_argument("--trial", type=int, default=0, help="trial number (seeds the fits; picks sampled params)")
    p.add_argument("--params", help="the trial's params as JSON (default: sampled from the search space)")
    p.add_argument("--rows", type=int, default=98_784, help="rows of the embedded survivors data")
    p.add_argument("--data", help="a data file (.npz, .csv, .parquet, .json) instead of the embedded data")
    p.add_argument("--target", help="target column of --data")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--early-stopping-rounds", type=int, default=50)
    p.add_argument("--threads", type=int, default=None,
                   help="library threads (default: the cores this process may use, its CPU quota included)")
    p.add_argument("--catboost-gpu-ram-part", type=_share, default=CatBoostFitter.DEFAULT_GPU_RAM_PART,
                   help="share of the GPU's memory a CatBoost fit reserves (default %(default)s, CatBoost's own; "
                        "0.05 saves about 0.4 s per fit on an H200 where the data fit in it, and a fit that "
                        "does not fit aborts this process)")
    p.add_argument("--fold-threads", type=_count, default=1,
                   help="folds trained at once, in threads sharing --threads (default 1). On a GPU only XGBoost "
                        "may; it gains given a core per fold (5 folds at once on 6 cores: 2.55x on an H200, "
                        "with --xgboost-async-pool)")
    p.add_argument("--xgboost-async-pool", action=argparse.BooleanOptionalAction, default=True,
                   help="XGBoost on the GPU allocates from CUDA's stream-ordered memory pool, XGBoost 3.2+ "
                        "(default: on); cudaMalloc's frees wait for the whole GPU, stalling folds at once")
    p.add_argument("--lease-dir", help="GPU lease directory (default: $WATCHER_LEASE_DIR or the temp dir)")
    p.add_argument("--lease-timeout", type=float, default=600.0, help="seconds to wait for the GPU's lease")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = claim_stdout()
    if args.gpu is not None:
        # Before any tree library is imported: the process must only ever see its one GPU.
        pin_environment(os.environ, args.gpu)
    from watcher_plugins.lease import GpuLease
    from watcher_plugins.tree_parallel.libraries import runs_on_gpu

    try:
        params = json.loads(args.params) if args.params else sample_params(args.model, args.trial, args.seed)
    except json.JSONDecodeError as exc:
        print(f"--params: not JSON: {exc}", file=sys.stderr)
        return 2
    ref = DataRef(path=args.data, target=args.target) if args.data else DataRef(embedded="survivors", rows=args.rows)
    job = TrialJob(args.model, args.trial, params, ref, args.folds, args.seed)
    use_gpu = runs_on_gpu(args.model, args.gpu is not None)
    if use_gpu and args.fold_threads > 1 and args.model not in FOLD_THREADS_GPU_MODEL_TYPES:
        print(f"--fold-threads: {args.model} trains one fold at a time on a GPU (only "
              f"{', '.join(sorted(FOLD_THREADS_GPU_MODEL_TYPES))} may train folds at once there)", file=sys.stderr)
        return 2
    threads = len(available_cores()) if args.threads is None else max(1, args.threads)
    settings = FitSettings(args.rounds, args.early_stopping_rounds, threads, use_gpu,
                           args.catboost_gpu_ram_part, args.xgboost_async_pool)
    try:
        if use_gpu:
            with GpuLease(args.gpu, args.lease_dir, args.lease_timeout,
                          purpose=f"tree trial CLI: {args.model} trial {args.trial}"):
                results = run_trial(job, settings, fold_threads=args.fold_threads)
        else:
            results = run_trial(job, settings, fold_threads=args.fold_threads)
    except WatcherPluginError as exc:
        print(json.dumps({"trial_number": args.trial, "model_type": args.model, "status": STATUS_FAIL,
                          "error": str(exc)}), file=out)
        return 1
    summary = trial_summary(job, results)
    summary.update(device="gpu" if use_gpu else "cpu", gpu=args.gpu if use_gpu else None,
                   cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), pid=os.getpid())
    print(json.dumps(summary), file=out)
    return 0 if summary["status"] == STATUS_OK else 1


if __name__ == "__main__":
    sys.exit(main())
