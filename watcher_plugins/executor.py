"""The interface every executor implements, and the run context the host hands it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher_plugins.devices import available_cores
from watcher_plugins.records import STATUS_FAIL, FoldResult, RefitJob, RefitResult, TrialJob

ResultCallback = Callable[[FoldResult], None]


@dataclass
class RunContext:
    """What an executor needs to know about the run beyond its own params.

    :param devices: GPU indices this run may use (empty: CPU only). Resolved by the host from the
        ``devices`` param; an executor takes each GPU's lease before using it.
    :param data_shape: rows and features of the run's dataset, where the host has loaded it (plans that
        depend on its size, such as how many tree workers host memory holds, use it).
    :param folds: the step's k-fold CV, where the host knows it before the first batch (each job carries
        its own; plans made before any job, such as that memory estimate, use this).
    """

    output_dir: Path
    devices: list[int]
    lease_dir: Path | None = None
    lease_timeout_s: float = 600.0
    trial_retries: int = 2
    cpu_count: int = field(default_factory=lambda: len(available_cores()))
    data_shape: tuple[int, int] | None = None
    folds: int | None = None


class Executor(ABC):
    """Runs batches of trial jobs. Every fold of every job gets exactly one FoldResult, whatever happens:
    a worker crash, an OOM or a bad param ends as a result with status "fail" or "oom" and a reason.
    """

    #: Set by the host around run_batch: called with the share (0..1) of the running batch's work done.
    progress_callback: Callable[[float], None] | None = None

    def __init__(self, params: Mapping[str, Any], context: RunContext):
        self.params = dict(params)
        self.context = context

    def report_progress(self, fraction: float) -> None:
        """Say how far the running batch has come (0..1), for the host's time left; between finished
        folds, which the host counts itself. Optional: an executor that never calls it is counted by folds."""
        if self.progress_callback is not None:
            self.progress_callback(fraction)

    @classmethod
    def check(cls, params: Mapping[str, Any], context: RunContext) -> None:
        """Raise ExecutorError if ``params`` contradict this run (its devices, say). Called for every
        executor of a run before any of them trains, and must start nothing. The default checks nothing."""

    @abstractmethod
    def run_batch(self, jobs: Sequence[TrialJob], on_result: ResultCallback | None = None) -> list[FoldResult]:
        """Run every job on every fold; call ``on_result`` as each fold finishes; return all results."""

    def refit(self, jobs: Sequence[RefitJob]) -> list[RefitResult]:
        """For each job: its trial's folds again (out-of-fold predictions), then one fit on every row,
        saved in the job's model_dir in the library's own format with what ``ModelType.predict`` needs
        (records.RefitJob, RefitResult). One result per job; a failure is a result with status "fail".
        The default refits nothing: an executor that cannot save its models says so."""
        return [RefitResult(job.trial.model_type, job.trial.trial_number, STATUS_FAIL,
                            error=f"executor {type(self).__name__} does not save models") for job in jobs]

    def close(self) -> None:
        """Stop workers and release leases. Idempotent."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
