"""What a tree worker's death costs the trial it was training.

Faults: a worker that dies mid-trial (segfault, abort, kill) is replaced by a new process with the
same pinning and the folds it owed are retried; the trial's crash number ``trial_retries`` + 1 (on
any of its folds) ends every fold it still owes as "fail" with the reason, and stops the workers still
training its other folds. Crashes count by try: folds of one try that die together (a trial that
crashes its library on every fold, the OOM killer taking several workers) cost the trial one retry. A
fold that raises is a "fail" result sent by the worker, which carries on.

A CatBoost GPU fit that outgrows the "auto" memory reserve aborts its worker (CatBoost raises its
out-of-memory error on a thread of its own; seen on an H200), so the worker cannot retry it itself: the
trial is retried with CatBoost's default reserve, not counted against ``trial_retries`` (the reserve was
ours to pick), and the data's later CatBoost trials get that reserve at once.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from watcher_plugins.records import TrialJob
from watcher_plugins.tree_parallel.libraries import CatBoostFitter, is_out_of_gpu_memory

if TYPE_CHECKING:
    from watcher_plugins.tree_parallel.scheduling import TrialTask
    from watcher_plugins.tree_parallel.slots import TreeWorkerProcess

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    RETRY = "retry"  # the folds go back to the queue, as a new try
    RETRY_SAME_TRY = "retry_same_try"  # the folds go back, in a try already counted as crashed
    GIVE_UP = "give_up"  # every fold the trial still owes fails


class RetryPolicy:
    """Counts a trial's crashes against ``trial_retries``, and picks CatBoost's GPU memory reserve."""

    def __init__(self, trial_retries: int, catboost_gpu_ram_part: float | None):
        self.trial_retries = trial_retries
        self.catboost_gpu_ram_part = catboost_gpu_ram_part
        # Data (DataRef keys) whose CatBoost GPU fits outgrew the "auto" reserve: their CatBoost trials get
        # CatBoost's default reserve from then on.
        self.catboost_full_reserve: set[str] = set()

    def catboost_reserve(self, job: TrialJob) -> float | None:
        """The GPU memory share a CatBoost fit of ``job`` reserves: the setting, or for "auto" (None)
        CatBoost's default once this job's data has been seen to need it."""
        if self.catboost_gpu_ram_part is None and job.data.key in self.catboost_full_reserve:
            return CatBoostFitter.DEFAULT_GPU_RAM_PART
        return self.catboost_gpu_ram_part

    def after_crash(self, task: TrialTask, worker: TreeWorkerProcess, lost: Sequence[int], reason: str) -> Outcome:
        """What becomes of ``lost``, the folds of ``task`` that died with ``worker`` for ``reason``."""
        job = task.job
        if self._outgrew_auto_reserve(task, worker):
            log.warning("%s during catboost trial %d: its GPU memory reserve (catboost_gpu_ram_part auto) was "
                        "too small; CatBoost trials on this data now reserve %s", reason, job.trial_number,
                        CatBoostFitter.DEFAULT_GPU_RAM_PART)
            self.catboost_full_reserve.add(job.data.key)
            return Outcome.RETRY
        if worker.task_try < len(task.crashes):
            # A fold of a try already counted as crashed: several of its folds died at once (a trial that
            # crashes its library on every fold, the OOM killer taking several workers). One try, one crash.
            log.warning("%s during %s trial %d, in a try already counted as crashed; its folds %s go back",
                        reason, job.model_type, job.trial_number, list(lost))
            return Outcome.RETRY_SAME_TRY
        task.crashes.append(reason)  # a crash on any of a trial's folds counts against the trial
        if len(task.crashes) <= self.trial_retries:
            log.warning("%s during %s trial %d; retrying (attempt %d of %d)", reason, job.model_type,
                        job.trial_number, len(task.crashes) + 1, self.trial_retries + 1)
            return Outcome.RETRY
        task.sent = False
        return Outcome.GIVE_UP

    @staticmethod
    def given_up(task: TrialTask, reason: str) -> str:
        return (f"{reason} during {task.job.model_type} trial {task.job.trial_number}; "
                f"gave up after {task.attempts} attempt(s)")

    @staticmethod
    def _outgrew_auto_reserve(task: TrialTask, worker: TreeWorkerProcess) -> bool:
        """Whether the worker died because a CatBoost GPU fit ran out of the "auto" reserve: it was sent
        the trial with the "auto" reserve, was not killed by the pool, and wrote CatBoost's out-of-memory
        error to stderr during that trial."""
        return (task.job.model_type == "catboost" and task.on_gpu and worker.task_catboost_reserve is None
                and not worker.kill_reason and any(is_out_of_gpu_memory(line) for line in worker.task_stderr))
