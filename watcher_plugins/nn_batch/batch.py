"""One worker's batch: load the jobs' data, pick the strategy and concurrency, train with OOM
recovery, report one outcome per job and a summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from watcher_plugins.errors import WatcherPluginError
from watcher_plugins.faults import Faults
from watcher_plugins.nn_batch import protocol
from watcher_plugins.nn_batch.budget import VramBudget, free_device_bytes
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.oom import train_with_oom_recovery
from watcher_plugins.nn_batch.protocol import BatchSettings, FitJob
from watcher_plugins.nn_batch.serial import SerialTrainer
from watcher_plugins.nn_batch.streams import StreamsTrainer
from watcher_plugins.nn_batch.training import FitOutcome, FitTask, Trainer, TrainSettings, precision_context
from watcher_plugins.records import STATUS_FAIL, STATUS_OK, STATUS_OOM

TRAINERS: dict[str, type[Trainer]] = {"serial": SerialTrainer, "streams": StreamsTrainer, "fused": FusedTrainer}
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "CUDA driver error", "device-side assert")


def is_fatal_device_error(exc: BaseException) -> bool:
    """A device error after which the CUDA context cannot be trusted (OOM excluded: it is recoverable)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _FATAL_MARKERS)


def resolve_strategy(strategy: str, n_concurrent: int | str) -> str:
    """auto: fused, the fastest, wherever fits can be packed (concurrency above 1); serial otherwise."""
    if strategy != "auto":
        return strategy
    return "serial" if n_concurrent == 1 else "fused"


def epoch_cost(task: FitTask) -> float:
    """A fit's work per epoch: its layers' weights times its dataset's rows (every epoch passes every
    row). Fits of one batch differ in width and depth, so epochs alone would weigh them alike."""
    widths = (task.data.n_features, *task.job.hidden_layers, task.data.n_outputs)
    return float(task.data.n_rows) * sum(a * b for a, b in zip(widths, widths[1:]))


def expected_epochs(epoch: int, best_epoch: int, patience: int, cap: int) -> int:
    """How many epochs a running fit will take in all, from its best epoch so far: at least until its
    patience runs out, and a fit still improving at epoch b is expected to run about b more (learning
    curves flatten: the longer it has improved, the longer it goes on), never past the cap."""
    return min(cap, max(epoch, best_epoch + 1 + patience, 2 * (best_epoch + 1)))


UNFINISHED_CEILING = 0.999  # the most a batch with a fit still to finish reports done (0.999 still rounds below 1)


class ProgressMeter:
    """Estimates how much of a batch's work is done and sends a progress line (protocol.progress_line)
    at most once per ``interval_s``. Work is epochs weighted by epoch_cost; a finished fit counts the
    epochs it ran, a running one its epochs so far of expected_epochs (its best epoch is read from the
    device once per line, not per epoch), and one not yet started the finished fits' mean (the cap
    before any has finished)."""

    def __init__(self, n_fits: int, settings: TrainSettings, send: Callable[[dict], None],
                 interval_s: float = protocol.PROGRESS_INTERVAL_S):
        self.n_fits = n_fits
        self.settings = settings
        self.send = send
        self.interval_s = interval_s
        self.costs: dict[tuple[int, int], float] = {}
        self.finished: dict[tuple[int, int], int] = {}  # key: epochs it ran
        self.trainer: Trainer | None = None
        self._last = time.monotonic()  # a batch shorter than interval_s sends none
        self._sent = 0.0

    def start(self, tasks: Sequence[FitTask], trainer: Trainer) -> None:
        self.costs = {task.key: epoch_cost(task) for task in tasks}
        self.trainer = trainer
        trainer.on_epoch = self.tick

    def fit_done(self, outcome: FitOutcome) -> None:
        self.finished[outcome.key] = max(0, outcome.epochs)
        self.tick()

    def fraction_done(self) -> float:
        """Work done over work expected, in [0, 1]."""
        cap, patience = self.settings.max_epochs, self.settings.patience
        done = expected = 0.0
        for key, epochs in self.finished.items():
            cost = self.costs.get(key, 0.0)
            done, expected = done + cost * epochs, expected + cost * epochs
        running = set()
        for pack in self.trainer.active_packs if self.trainer is not None else []:
            best = pack.stopping.best_epoch.tolist()
            for m, task in enumerate(pack.tasks):
                if pack.left[m] or task.key in self.finished:
                    continue
                running.add(task.key)
                cost = self.costs.get(task.key, 0.0)
                done += cost * pack.epoch
                expected += cost * expected_epochs(pack.epoch, best[m], patience, cap)
        typical = (sum(self.finished.values()) / len(self.finished)) if self.finished else cap
        expected += sum(cost * max(1.0, typical) for key, cost in self.costs.items()
                        if key not in self.finished and key not in running)
        # A fit past its last epoch still has to be scored and sent: 1.0 only once every fit has finished.
        ceiling = 1.0 if len(self.finished) >= self.n_fits else UNFINISHED_CEILING
        return min(ceiling, done / expected) if expected > 0 else ceiling

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        fraction = max(self._sent, self.fraction_done())  # never goes back (an OOM retry runs epochs again)
        self._last, self._sent = now, fraction
        model_epochs = self.trainer.model_epochs if self.trainer is not None else 0
        self.send(protocol.progress_line(len(self.finished), self.n_fits, model_epochs, round(fraction, 4)))


class BatchRunner:
    """Trains batches on one device, keeping datasets and the calibrated VRAM budget between batches."""

    def __init__(self, device: torch.device, faults: Faults | None = None):
        """``faults``: for tests only (watcher_plugins/faults.py); None injects none."""
        self.device = device
        self.cache = DeviceDatasetCache(device)
        self.faults = faults or Faults()
        self.budget = VramBudget(0)

    def _tasks(self, jobs: Sequence[FitJob], emit: Callable[[FitOutcome], None]) -> list[FitTask]:
        tasks = []
        for job in jobs:
            try:
                tasks.append(FitTask.build(job, self.cache.for_fold(job.data, job.folds, job.seed, job.fold_idx)))
            except WatcherPluginError as exc:
                emit(FitOutcome(job.key, STATUS_FAIL, None, 0.0, error=str(exc)))
        return tasks

    def _concurrency(self, strategy: str, requested: int | str, tasks: Sequence[FitTask],
                     settings: TrainSettings) -> int:
        if strategy == "serial":
            return 1
        if requested != "auto":
            return int(requested)
        if strategy == "fused":
            return len(tasks)  # the budget sizes each pack
        data = tasks[0].data
        return min(len(tasks), self.budget.max_concurrent([t.job.hidden_layers for t in tasks], data.n_rows, data.n_features,
                                          settings.precision, any(t.job.dropout > 0 for t in tasks)))

    def run(self, jobs: Sequence[FitJob], batch: BatchSettings, emit: Callable[[FitOutcome], None],
            progress: Callable[[dict], None] | None = None) -> dict:
        """Train every job, calling ``emit`` once per job; return the batch summary. ``progress``, if
        given, gets a progress line (ProgressMeter) at most once per protocol.PROGRESS_INTERVAL_S. A
        fatal device error propagates; any other error fails the jobs not yet done."""
        started = time.perf_counter()
        counts = {STATUS_OK: 0, STATUS_FAIL: 0, STATUS_OOM: 0}
        done: set[tuple[int, int]] = set()
        settings = TrainSettings(batch.max_epochs, batch.patience, batch.precision)
        meter = ProgressMeter(len(jobs), settings, progress) if progress is not None else None

        def on_done(outcome: FitOutcome) -> None:
            counts[outcome.status] += 1
            done.add(outcome.key)
            emit(outcome)
            if meter is not None:
                meter.fit_done(outcome)

        strategy = resolve_strategy(batch.strategy, batch.n_concurrent)
        summary: dict[str, Any] = {"strategy": strategy, "precision": batch.precision, "n_concurrent_requested": batch.n_concurrent,
                   "n_concurrent_used": 0, "oom_retries": 0, "model_epochs": 0}
        tasks = self._tasks(jobs, on_done)
        if tasks:
            self.budget.budget_bytes = free_device_bytes(self.device) * batch.vram_budget_fraction
            budget = self.budget if batch.n_concurrent == "auto" else None
            hook = self.faults.before_pack if self.faults.active else None
            trainer = (FusedTrainer(settings, self.device, hook, budget) if strategy == "fused"
                       else TRAINERS[strategy](settings, self.device, hook))
            if meter is not None:
                meter.start(tasks, trainer)
            n_concurrent = self._concurrency(strategy, batch.n_concurrent, tasks, settings)
            try:
                with precision_context(settings.precision, self.device):
                    report = train_with_oom_recovery(trainer, tasks, n_concurrent, on_done)
                used = report.n_concurrent_used
                if isinstance(trainer, FusedTrainer) and trainer.pack_sizes:
                    used = min(used, max(trainer.pack_sizes))
                    summary["pack_sizes"] = trainer.pack_sizes
                    summary["compactions"] = trainer.compactions
                summary["graph_captures"] = trainer.graph_captures
                summary.update(n_concurrent_used=used, oom_retries=report.oom_retries)
            except Exception as exc:
                if is_fatal_device_error(exc):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                for task in tasks:
                    if task.key not in done:
                        on_done(FitOutcome(task.key, STATUS_FAIL, None, 0.0, error=reason))
            summary["model_epochs"] = trainer.model_epochs
            summary["packs"] = sorted(trainer.pack_kinds)
        summary.update(jobs=len(jobs), ok=counts[STATUS_OK], fail=counts[STATUS_FAIL], oom=counts[STATUS_OOM],
                       seconds=round(time.perf_counter() - started, 4))
        return summary
