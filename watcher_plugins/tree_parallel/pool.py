"""TreeTrialPool: long-lived worker processes, each pinned to a GPU or to CPU cores, and the batches
of trials run on them.

The pool is the façade over four jobs, each in a module of its own: the worker processes and their
slots (slots.py), which trial a free worker takes (scheduling.py), the GPU leases held for the workers
(leases.py), and what a worker's death costs its trial (retry.py). Here: a batch's loop, which reads the
workers' events (in this thread, as ``on_result`` is called) until every fold has its result.

Every asked fold ends with a result, "ok" or "fail" with a reason: a worker that dies is replaced and
its folds retried or failed (retry.py), a worker that refuses a trial's request fails it, and a trial
with no live worker left to run it fails. An exception in ``run`` (Ctrl-C, a callback that raised) kills
every worker, whose answers would belong to no batch; the next batch starts fresh ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from watcher_plugins.child_process import BadLine
from watcher_plugins.errors import ExecutorError
from watcher_plugins.records import STATUS_FAIL, FoldResult, RefitJob, RefitResult, TrialJob
from watcher_plugins.tree_parallel.leases import LEASE_POLL_S, PoolLeases
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.retry import Outcome, RetryPolicy
from watcher_plugins.tree_parallel.scheduling import TrialQueues, TrialTask
from watcher_plugins.tree_parallel.slots import READY_TIMEOUT_S, TreeWorkerProcess, WorkerSlots

log = logging.getLogger(__name__)

DONE_WAIT_S = 10.0  # at the end of a batch, how long to wait for the workers' "done" after their last fold


@dataclass(frozen=True)
class PoolSettings:
    """What every worker of a pool shares."""

    rounds: int = 500
    early_stopping_rounds: int = 50
    lease_dir: str | None = None
    lease_timeout_s: float = 600.0
    trial_retries: int = 2
    trial_timeout_s: float = 3600.0  # a wedged library call must not hang the run
    xgboost_per_gpu: int = 1  # XGBoost trials that may train at once on one GPU
    xgboost_gpu_fold_threads: int = 1  # folds of a GPU XGBoost trial its worker trains at once
    xgboost_gpu_async_pool: bool = True  # GPU XGBoost allocates from CUDA's stream-ordered pool
    catboost_gpu_ram_part: float | None = None  # None = "auto" (see libraries.CatBoostFitter)


class TreeTrialPool:
    """Long-lived tree worker processes, one per placement, and the batch scheduler over them."""

    def __init__(self, placements: Sequence[WorkerPlacement], settings: PoolSettings):
        if not placements:
            raise ExecutorError("a tree pool needs at least one worker placement")
        if settings.xgboost_per_gpu < 1:
            raise ExecutorError(f"xgboost_per_gpu must be >= 1, got {settings.xgboost_per_gpu}")
        self.placements = list(placements)
        self.settings = settings
        self.slots = WorkerSlots(self.placements, settings)
        self.leases = PoolLeases((p.gpu for p in self.placements if p.gpu is not None), settings.lease_dir,
                                 settings.lease_timeout_s)
        self.retry = RetryPolicy(settings.trial_retries, settings.catboost_gpu_ram_part)
        self.queues = TrialQueues(settings.xgboost_per_gpu)
        self._results: dict[tuple[int, int], FoldResult] = {}
        self._on_result: Callable[[FoldResult], None] | None = None
        self._owed = 0
        self.restarts = 0  # workers replaced after dying unannounced (crashes, kills)
        self.retirements = 0  # workers replaced after retiring (a fit failed on their GPU)
        self.closed = False

    @property
    def has_gpu(self) -> bool:
        return any(p.gpu is not None for p in self.placements)

    @property
    def catboost_full_reserve(self) -> set[str]:
        """Data (DataRef keys) whose CatBoost trials get CatBoost's default GPU memory reserve (retry.py)."""
        return self.retry.catboost_full_reserve

    def busy_workers(self) -> list[tuple[int, str, int]]:
        """(pid, model type, trial number) of each worker now training a trial."""
        busy = []
        for w in list(self.slots.workers):  # may be called from another thread: read each field once
            task = w.task if w is not None else None
            pid = w.pid if w is not None else None  # None only for a worker that never started
            if w is not None and task is not None and not w.awaiting_lease and pid is not None:
                busy.append((pid, task.job.model_type, task.job.trial_number))
        return busy

    def leases_held(self) -> list[int]:
        """The GPUs whose lease this pool holds now."""
        return self.leases.held()

    def worker_pids(self) -> list[int]:
        return self.slots.pids()

    def start(self) -> None:
        """Start every worker and wait until each says it is ready."""
        if self.closed:
            raise ExecutorError("the tree pool is closed")
        self.slots.spawn_missing()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(w.ready for w in self.slots) and time.monotonic() < deadline:
            self._handle(*self.slots.next_event(deadline))
        if not any(w.ready for w in self.slots):
            raise ExecutorError("no tree worker could be started: " + self.slots.start_failures())

    def ping(self) -> list[dict]:
        """Each live worker's self-description (pid, GPU, threads, CUDA_VISIBLE_DEVICES, loaded modules)."""
        self.start()
        live = [w for w in self.slots if w.ready]
        for w in live:
            w.info = {}
            w.send({"command": "ping"})
        deadline = time.monotonic() + 30
        while any(not w.info for w in live) and time.monotonic() < deadline:
            self._handle(*self.slots.next_event(deadline))
        return [w.info for w in live]

    def close(self) -> None:
        """Shut every worker down (slots.py: at once, bounded) and release the leases. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.slots.close()
        self.leases.release()

    def run(self, jobs: Sequence[TrialJob], on_result: Callable[[FoldResult], None] | None = None
            ) -> list[FoldResult]:
        """Train every job on every fold; ``on_result`` is called (in this thread) as each fold ends."""
        self.start()
        tasks = self.queues.load(jobs, self.has_gpu)
        self._results = {}
        self._on_result = on_result
        self._owed = sum(job.folds for job in jobs)
        self.leases.new_batch()
        try:
            while self._owed > 0:
                self._poll_leases()  # first: the workers of trials it fails are free for _dispatch
                self._dispatch()
                self.leases.release_idle(lambda gpu: bool(self._gpu_tasks(gpu)))
                if not any(w.task is not None for w in self.slots):
                    self._fail_unplaceable()
                    if self._owed == 0:
                        break
                waiting = any(w.awaiting_lease for w in self.slots)
                self._handle(*self.slots.next_event(time.monotonic() + (LEASE_POLL_S if waiting else 1.0)))
                self.slots.kill_overdue()
                for slot, worker, undead in self.slots.silently_dead():
                    if undead:
                        self.leases.stuck.add(worker.placement.gpu)
                    self._on_worker_death(slot, worker)
            # Every fold has its result. A worker sends "done" right after its last fold: take those in,
            # so that no trial of this batch still counts as on its GPU when the next batch starts.
            deadline = time.monotonic() + DONE_WAIT_S
            while time.monotonic() < deadline and any(w.task is not None for w in self.slots):
                self._handle(*self.slots.next_event(deadline))
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, a callback that raised): workers may be mid-trial, and their
            # answers would belong to no batch. Kill them, dead before their GPUs' leases are free.
            self.leases.stuck |= self.slots.kill_all()
            self.leases.release(keep=self.leases.stuck)
            raise
        self.leases.release(keep=self.leases.stuck)
        return [self._results[(t.index, f)] for t in tasks for f in range(t.job.folds)]

    def refit(self, jobs: Sequence[RefitJob]) -> list[RefitResult]:
        """Refit every job in the workers (refits.py: where each runs, its lease, its failures); one
        result per job, in job order."""
        from watcher_plugins.tree_parallel.refits import RefitRun

        if self.closed:
            raise ExecutorError("the tree pool is closed")
        return RefitRun(self, jobs).run() if jobs else []

    def _dispatch(self) -> None:
        for w in self.slots:
            if not w.ready or w.retiring or w.task is not None:
                continue
            if w.stdout_closed or not w.alive:
                continue  # died idle (between batches, say): its death is handled from its event, not a trial's
            gpu = w.placement.gpu
            taken = self.queues.take(gpu, self._gpu_tasks(gpu) if gpu is not None else [], gpu in self.leases.lost)
            if taken is None:
                continue
            task, w.folds = taken
            w.task = task
            w.task_try = len(task.crashes)
            if task.on_gpu and not self.leases.now(cast(int, gpu)):  # only a worker on a GPU takes a GPU trial
                w.awaiting_lease = True  # sent by _poll_leases once the pool holds the lease
            else:
                self._send_task(w)

    def _gpu_tasks(self, gpu: int) -> list[TrialTask]:
        """The GPU trials assigned to the workers on ``gpu``: training, or waiting for its lease."""
        return [w.task for w in self.slots if w.task is not None and w.task.on_gpu and w.placement.gpu == gpu]

    def _send_task(self, w: TreeWorkerProcess) -> None:
        assert w.task is not None  # only a worker given a task is sent one
        w.awaiting_lease = False
        w.task_started = time.monotonic()
        w.task_catboost_reserve = self.retry.catboost_reserve(w.task.job)
        w.task_stderr.clear()  # and again when its marker comes: a late line of the last trial may come first
        # A worker that died since _dispatch looked never gets the trial: its death is not the trial's crash.
        w.send_failed = not w.send({"command": "train", "job": w.task.job.to_json(), "folds": list(w.folds),
                                    "catboost_gpu_ram_part": w.task_catboost_reserve})

    def _poll_leases(self) -> None:
        """Start the trials waiting for a lease that is free now; fail those that waited past the timeout."""
        def waiting(gpu: int) -> list[TreeWorkerProcess]:
            return [w for w in self.slots if w.awaiting_lease and w.placement.gpu == gpu]

        granted, failed = self.leases.poll(lambda gpu: bool(waiting(gpu)))
        for gpu in granted:
            for w in waiting(gpu):
                self._send_task(w)
        for gpu, error in failed.items():
            for w in waiting(gpu):  # never sent: the worker is free again
                task, _ = w.release_task()
                if task is not None:  # always: a worker waiting for a lease has its task
                    self._fail_task(task, error)
        if failed and self.leases.all_lost:
            # Every GPU is out for the rest of the batch: its queued trials fail now with the same reason,
            # rather than each waiting lease_timeout_s again.
            for task in self.queues.drain(gpu_only=True):
                self._fail_task(task, "; ".join(self.leases.lost.values()))

    def _fail_unplaceable(self) -> None:
        """Nothing is running: whatever is still queued has no live worker that could take it."""
        # A worker starting, or retiring (its replacement starts when its exit is seen), will take them.
        if any(not w.ready or w.retiring for w in self.slots):
            return
        reason = self.slots.start_failures() or "no live worker can run it"
        for task in self.queues.drain():
            self._fail_task(task, f"no tree worker left to run this trial: {reason}")

    def _record(self, result: FoldResult, task: TrialTask) -> None:
        key = (task.index, result.fold_idx)
        if key in self._results or result.fold_idx not in task.folds:
            return  # a late duplicate can never count twice
        task.folds.remove(result.fold_idx)
        self._results[key] = result
        self._owed -= 1
        if self._on_result is not None:
            self._on_result(result)

    def _fail_task(self, task: TrialTask, reason: str) -> None:
        """Every fold the trial still owes ends as "fail"; workers training its other folds are stopped
        (their work is for a trial given up, and would keep them from the next ones)."""
        self.queues.remove(task)
        for w in self.slots:
            if w.task is task and not w.awaiting_lease and not w.kill_reason:
                w.kill(f"its {task.job.model_type} trial {task.job.trial_number} failed on another worker")
        self._fail_folds(task, task.folds, reason)

    def _fail_folds(self, task: TrialTask, folds: Sequence[int], reason: str) -> None:
        for fold_idx in list(folds):
            self._record(FoldResult(task.job.trial_number, fold_idx, task.job.model_type, None, 0.0, STATUS_FAIL,
                                    error=reason, info={"attempts": task.attempts}), task)

    def _handle(self, worker: TreeWorkerProcess | None, msg: dict | BadLine | None) -> None:
        slot = self.slots.slot_of(worker)
        if slot is None or worker is None:  # slot_of(None) is None
            return  # a timeout, or a stale event from a process already replaced
        if msg is None:
            self._on_worker_death(slot, worker)
        elif isinstance(msg, BadLine):  # its protocol stream is corrupt: replace it
            log.warning("%s wrote %s", worker.placement.describe(), msg)
            worker.kill(f"it wrote {msg}")
        elif msg["event"] == "ready":
            self.slots.became_ready(slot, worker, msg)
        elif msg["event"] == "pong":
            worker.info = msg
        elif msg["event"] == "fold" and worker.task is not None:
            self._record(FoldResult.from_json(msg["result"]), worker.task)
        elif msg["event"] == "done" and worker.task is not None:
            worker.retiring = msg["retiring"]  # its exit follows; the slot restarts then
            task, owed = worker.release_task()
            if task is not None and owed:  # cannot happen with a sound worker; never leave a fold without a result
                self._fail_folds(task, owed, f"{worker.placement.describe()} ended the trial without results")
        elif msg["event"] == "error":
            log.warning("%s refused a request: %s: %s", worker.placement.describe(), msg["code"], msg["message"])
            if worker.task is not None and not worker.awaiting_lease:  # the trial it was sent: never trained
                task, refused = worker.release_task()
                if task is not None:  # always: checked above
                    self._fail_folds(task, refused, f"{worker.placement.describe()} refused the trial's request: "
                                                    f"{msg['code']}: {msg['message']}")

    def _on_worker_death(self, slot: int, worker: TreeWorkerProcess) -> None:
        reason = worker.death_reason()
        never_sent = worker.awaiting_lease or worker.send_failed
        task, lost = worker.release_task()
        may_restart = self.slots.vacate(slot, worker, reason)
        if task is not None and never_sent:  # not an attempt
            self.queues.requeue(task, lost)
        elif task is not None and lost:  # lost is empty without a task
            outcome = self.retry.after_crash(task, worker, lost, reason)
            if outcome is Outcome.GIVE_UP:
                self._fail_task(task, self.retry.given_up(task, reason))
            else:
                self.queues.requeue(task, lost, same_try=outcome is Outcome.RETRY_SAME_TRY)
        if self.closed or not may_restart:
            return
        if worker.retiring:
            self.retirements += 1  # it said it would exit after a failed GPU fit: not a crash
            log.info("%s retired after a fit failed on its GPU; a fresh worker takes its place",
                     worker.placement.describe())
        else:
            self.restarts += 1
        self.slots.spawn(slot)
