"""The error hierarchy. Every message names the file, JSON path or column, and what was expected."""

from __future__ import annotations


class WatcherPluginError(Exception):
    """Root of every error this package raises on purpose; the CLI prints it without a traceback."""

    exit_code = 1


class ManifestError(WatcherPluginError):
    """A manifest or --params that is not JSON or breaks its schema. Carries every problem found."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StepRangeError(WatcherPluginError):
    """A --start-step/--end-step range that selects no registered step."""

    exit_code = 2


class PluginError(WatcherPluginError):
    """A plugin registration problem: duplicate names, unknown names, bad registrations."""

    exit_code = 2


class DataError(WatcherPluginError):
    """A dataset that is missing, unreadable, or not numeric/finite where it must be."""

    exit_code = 2


class OutputDirError(WatcherPluginError):
    """The output directory cannot be created or written."""

    exit_code = 2


class LeaseError(WatcherPluginError):
    """A GPU lease could not be had."""


class LeaseTimeout(LeaseError):
    """A GPU lease was not had within its timeout; the message names the holder."""


class ProtocolError(WatcherPluginError):
    """A worker protocol line that is not a valid request or response. `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


class WorkerCrashed(WatcherPluginError):
    """A worker process died or sent a fatal line; the executor replaces it."""


class ExecutorError(WatcherPluginError):
    """An executor could not run a batch at all (as opposed to one trial failing)."""


class StorageError(WatcherPluginError):
    """The Optuna storage could not be opened or used as asked (bad URL, database down, other study)."""

    exit_code = 2


class StorageLost(StorageError):
    """The database connection was lost during a run and did not come back within the retries."""

    exit_code = 1
