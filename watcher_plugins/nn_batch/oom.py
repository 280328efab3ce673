"""OOM recovery: on torch.cuda.OutOfMemoryError, free everything and retry the fits not yet done with
half the concurrency, down to 1; a fit that does not fit even alone ends with status "oom", and the
others go on at the concurrency they had.

Any other error passes through: the caller decides whether it is fatal for the worker.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from watcher_plugins.nn_batch.training import FitOutcome, FitTask, OutcomeCallback, Trainer
from watcher_plugins.records import STATUS_OOM


@dataclass
class RecoveryReport:
    n_concurrent_requested: int
    n_concurrent_used: int
    oom_retries: int = 0
    oom_failed: int = 0


def release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_with_oom_recovery(trainer: Trainer, tasks: Sequence[FitTask], n_concurrent: int,
                            on_done: OutcomeCallback) -> RecoveryReport:
    """Train ``tasks`` at most ``n_concurrent`` at a time; every task gets exactly one outcome."""
    pending = {task.key: task for task in tasks}

    def done(outcome: FitOutcome) -> None:
        if pending.pop(outcome.key, None) is not None:
            on_done(outcome)

    report = RecoveryReport(n_concurrent, n_concurrent)
    while pending:
        message = None
        try:
            trainer.train(list(pending.values()), report.n_concurrent_used, done)
        except torch.cuda.OutOfMemoryError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
        if message is None:
            break
        # Freed here, outside the except block: inside it, the exception's traceback still holds the
        # frames of the failed pack, and with them its tensors.
        running = [key for key in trainer.running if key in pending]
        trainer.running = []
        release_device_memory(trainer.device)
        concurrency = len(running) or report.n_concurrent_used
        if concurrency > 1:
            report.n_concurrent_used = max(1, concurrency // 2)
            report.oom_retries += 1
            continue
        # One fit did not fit alone. The concurrency stays: that fit may have had a pack of its own
        # (the budget's sizing) while the others share packs, and they must not all train alone now.
        key = running[0] if running else next(iter(pending))
        report.oom_failed += 1
        done(FitOutcome(key, STATUS_OOM, None, 0.0, error=f"out of memory even when trained alone: {message}"))
    return report
