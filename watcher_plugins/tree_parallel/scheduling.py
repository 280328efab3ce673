"""Which trial a free tree worker takes next.

A trial of a GPU model type (CatBoost, XGBoost) runs on a GPU worker whenever the pool has GPUs,
LightGBM always on CPU threads. A GPU may have several workers (``xgboost_per_gpu``, see
placement.py); on each GPU, a CatBoost trial starts only when no other GPU trial is on that GPU, and
while it runs no other GPU trial starts there; XGBoost trials fill up to ``xgboost_per_gpu`` of its
workers at once. Free GPU workers take GPU trials first (the queue's first one if their GPU is idle,
else its first XGBoost trial, which may pass a CatBoost trial waiting for the GPU to empty), then
LightGBM; CPU workers take only LightGBM. A GPU trial goes to one worker whole (its XGBoost folds
train at once, in threads); a CPU trial goes out a fold at a time, so that at the end of a batch its
last trials' folds spread over every free worker rather than each trial running its folds one after
another on one worker (on two H200s that tail was the wall time). Where a fold runs never changes its
result: the device follows from the model type, and the fits are bit-stable across thread counts (see
libraries.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from watcher_plugins.records import TrialJob
from watcher_plugins.tree_parallel.libraries import GPU_MODEL_TYPES, SHARED_GPU_MODEL_TYPES


@dataclass(eq=False)
class TrialTask:
    """A trial in flight: the folds it still owes, those not yet sent to a worker, and its crashes."""

    index: int  # position in the batch, for the order of the returned results
    job: TrialJob
    folds: list[int]  # folds without a result yet
    pending: list[int]  # folds not sent to any worker
    on_gpu: bool
    sent: bool = False  # some fold went to a worker since the trial's last crash
    crashes: list[str] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        """Tries of the trial: one per counted crash, and one more if it is out again since the last."""
        return len(self.crashes) + (1 if self.sent else 0)

    def take(self, one_fold: bool) -> list[int]:
        """The folds the next worker gets: the first pending one, or all of them."""
        taken = self.pending[:1] if one_fold else self.pending
        self.pending = self.pending[len(taken):]
        self.sent = True
        return taken

    def give_back(self, folds: Sequence[int]) -> None:
        """Folds a worker will not finish go back to the pending ones (those still owed)."""
        self.pending = sorted({f for f in folds if f in self.folds} | set(self.pending))


class TrialQueues:
    """The batch's trials not (wholly) given to a worker yet: GPU trials and CPU trials, in batch order."""

    def __init__(self, xgboost_per_gpu: int = 1):
        self.xgboost_per_gpu = xgboost_per_gpu
        self.gpu: deque[TrialTask] = deque()
        self.cpu: deque[TrialTask] = deque()

    def load(self, jobs: Sequence[TrialJob], has_gpu: bool) -> list[TrialTask]:
        """Queue a batch; its tasks, in batch order."""
        tasks = [TrialTask(i, job, list(range(job.folds)), list(range(job.folds)),
                           has_gpu and job.model_type in GPU_MODEL_TYPES)
                 for i, job in enumerate(jobs)]
        self.gpu = deque(t for t in tasks if t.on_gpu)
        self.cpu = deque(t for t in tasks if not t.on_gpu)
        return tasks

    def take(self, gpu: int | None, on_that_gpu: Sequence[TrialTask], gpu_out: bool
             ) -> tuple[TrialTask, list[int]] | None:
        """The trial a free worker on ``gpu`` (None: a CPU worker) starts now and the folds it gets, or
        None. ``on_that_gpu``: the GPU trials its GPU's workers have; ``gpu_out``: that GPU takes none."""
        task = self._next_gpu_task(on_that_gpu) if gpu is not None and not gpu_out else None
        if task is None and self.cpu:
            task = self.cpu[0]
        if task is None:
            return None
        folds = task.take(one_fold=not task.on_gpu)
        if not task.pending and self.cpu and self.cpu[0] is task:
            self.cpu.popleft()
        return task, folds

    def _next_gpu_task(self, on_gpu: Sequence[TrialTask]) -> TrialTask | None:
        """The GPU trial a free worker may start on a GPU with ``on_gpu``, taken off the queue, or None."""
        if not self.gpu:
            return None
        if not on_gpu:
            return self.gpu.popleft()
        if (len(on_gpu) >= self.xgboost_per_gpu
                or any(t.job.model_type not in SHARED_GPU_MODEL_TYPES for t in on_gpu)):
            return None  # full, or a CatBoost trial owns the GPU
        for i, task in enumerate(self.gpu):
            if task.job.model_type in SHARED_GPU_MODEL_TYPES:
                del self.gpu[i]
                return task
        return None

    def requeue(self, task: TrialTask, folds: Sequence[int], same_try: bool = False) -> None:
        """``folds`` of ``task`` go back to the front of its queue. Unless they go back within the same
        try, the trial counts as out again only when a worker takes them (a crash that sent them back is
        counted by the caller)."""
        if not same_try:
            task.sent = False
        task.give_back(folds)
        queue = self.gpu if task.on_gpu else self.cpu
        if task not in queue:
            queue.appendleft(task)

    def remove(self, task: TrialTask) -> None:
        task.pending = []
        for q in (self.gpu, self.cpu):
            if task in q:
                q.remove(task)

    def drain(self, gpu_only: bool = False) -> Iterable[TrialTask]:
        """Take every queued trial off (the GPU trials only), in order."""
        for q in (self.gpu,) if gpu_only else (self.gpu, self.cpu):
            while q:
                yield q.popleft()
