"""The pool's worker processes: one slot per placement, holding its live worker or none.

Each worker is a ChildProcess (child_process.py) pinned as its placement says: CUDA_VISIBLE_DEVICES
narrowed to its GPU (or emptied), its libraries' thread counts sized to its cores before the OpenMP
runtime loads. What it says on stdout becomes (worker, message) events on the slots' one queue; its
stderr's last lines are kept for its death's reason. A slot whose process dies is started again with the
same placement (the pool decides when: pool.py); one that dies MAX_FAILED_STARTS times before becoming
ready is given up until the next batch's start().

The pool learns of a death from the end of the worker's stdout. A worker that exited while a process it
forked still holds its pipes, or one that outlived SIGKILL (stuck in the kernel, as in a hung GPU driver
call), sends none: SILENT_DEATH_S after the pool saw its exit (or sent SIGKILL) it is handled as dead all
the same.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from watcher_plugins.child_process import BadLine, ChildProcess, protocol_schema
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.worker import PROTOCOL_SCHEMA, TASK_STDERR_MARKER

if TYPE_CHECKING:
    from watcher_plugins.tree_parallel.pool import PoolSettings
    from watcher_plugins.tree_parallel.scheduling import TrialTask

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
MAX_FAILED_STARTS = 3  # a slot whose process dies this many times before becoming ready is given up
STDERR_TAIL_LINES = 20
STOP_WAIT_S = 10.0  # how long closing waits for the workers asked to stop, all together, before killing them
SILENT_DEATH_S = 10.0  # a worker exited (or SIGKILLed) this long without its end of stream is handled as dead
REPLIES = protocol_schema(PROTOCOL_SCHEMA, "reply")
SHUTDOWN = {"command": "shutdown"}


def worker_environment(placement: WorkerPlacement) -> dict[str, str]:
    """What a worker's environment adds: its libraries' thread counts, sized before the OpenMP runtime
    loads (its GPU is pinned by child_process.child_environment)."""
    threads = str(placement.threads)
    return {var: threads for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


Event = tuple["TreeWorkerProcess | None", "dict | BadLine | None"]


class TreeWorkerProcess:
    """One worker process, and what the pool knows of it: its task, the folds it was sent, its state."""

    def __init__(self, placement: WorkerPlacement, settings: PoolSettings, events: queue.Queue):
        self.placement = placement
        self.ready = False
        self.task: TrialTask | None = None
        self.folds: list[int] = []  # the folds of its task sent to it
        self.task_try = 0  # its task's crashes counted when it took the folds: which try of the trial it runs
        self.awaiting_lease = False  # its task is a GPU trial not sent yet: the pool waits for the lease
        self.send_failed = False  # its task could not be written to it: it was dead already, and never had it
        self.retiring = False  # it said it exits after its trial (a GPU fit failed): it gets no more tasks
        self.task_started = 0.0
        self.kill_reason: str | None = None  # why the pool killed it, when it did
        self.killed_at: float | None = None
        self.exited_at: float | None = None  # when the pool first saw its process gone
        # The CatBoost reserve its trial was sent with: with the stderr since that trial began, what decides
        # a free retry after out-of-memory (retry.py).
        self.task_catboost_reserve: float | None = None
        self.info: dict = {}
        config = {"placement": placement.to_json(), "rounds": settings.rounds,
                  "early_stopping_rounds": settings.early_stopping_rounds,
                  "xgboost_gpu_fold_threads": settings.xgboost_gpu_fold_threads,
                  "xgboost_gpu_async_pool": settings.xgboost_gpu_async_pool}
        self.child = ChildProcess(
            [sys.executable, "-m", "watcher_plugins.tree_parallel.worker", "--config", json.dumps(config)],
            placement.describe(), lambda message: events.put((self, message)), gpu=placement.gpu,
            env=worker_environment(placement), replies=REPLIES, stderr_lines=STDERR_TAIL_LINES,
            stderr_marker=TASK_STDERR_MARKER)
        self.child.start()
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:  # None: its process could not be started
        return self.child.pid

    @property
    def alive(self) -> bool:
        return self.child.alive

    @property
    def stdout_closed(self) -> bool:
        return self.child.stdout_closed

    @property
    def stderr_tail(self):
        return self.child.stderr_tail

    @property
    def task_stderr(self):
        """Its stderr since it began its current trial (it writes TASK_STDERR_MARKER first)."""
        return self.child.stderr_since_marker

    def send(self, message: dict) -> bool:
        return self.child.send(message)

    def release_task(self) -> tuple[TrialTask | None, list[int]]:
        """Free it of its task: the task, and the folds sent to it that still owe a result."""
        task, folds = self.task, self.folds
        self.task, self.folds, self.awaiting_lease, self.send_failed = None, [], False, False
        return task, [f for f in folds if task is not None and f in task.folds]

    def kill(self, reason: str) -> None:
        """Kill it on purpose; its end-of-stream event then takes the usual worker-death path."""
        if self.child.alive:
            self.kill_reason = reason
            self.killed_at = time.monotonic()
            self.child.kill()

    def death_reason(self) -> str:
        code = self.child.exit_code()
        if code is None:
            how = "did not die of SIGKILL (stuck in the kernel, as in a hung GPU driver call); left behind"
            if self.kill_reason:
                how = f"was killed ({self.kill_reason}) but {how}"
        elif self.kill_reason:
            how = f"was killed: {self.kill_reason}"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"was killed by {name}"
        else:
            how = f"exited with status {code}"
        tail = self.child.last_stderr(1)
        return (f"tree worker pid {self.pid} ({self.placement.describe()}) {how}"
                + (f"; its last stderr line: {tail[0]}" if tail else ""))


def _kill_all(workers: list[TreeWorkerProcess]) -> None:
    for w in workers:
        w.child.kill()


class WorkerSlots:
    """One slot per placement, each with its live worker or None, and the queue of their events."""

    def __init__(self, placements: Sequence[WorkerPlacement], settings: PoolSettings):
        self.placements = list(placements)
        self.settings = settings
        self.events: queue.Queue = queue.Queue()
        self.workers: list[TreeWorkerProcess | None] = [None] * len(self.placements)
        self.failed_starts = [0] * len(self.placements)
        self.start_errors: list[str] = [""] * len(self.placements)
        # Whatever happens to the pool, its workers do not outlive it.
        self._finalizer = weakref.finalize(self, _kill_all, [])

    def __iter__(self) -> Iterator[TreeWorkerProcess]:
        """The slots' workers (live, or dead and not yet handled)."""
        return iter([w for w in self.workers if w is not None])

    def spawn(self, slot: int) -> None:
        self.workers[slot] = TreeWorkerProcess(self.placements[slot], self.settings, self.events)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_all, list(self))

    def spawn_missing(self) -> None:
        for slot, worker in enumerate(self.workers):
            if worker is None:
                self.spawn(slot)

    def slot_of(self, worker: TreeWorkerProcess | None) -> int | None:
        """Its slot, or None for a worker already replaced (a stale event)."""
        return self.workers.index(worker) if worker is not None and worker in self.workers else None

    def became_ready(self, slot: int, worker: TreeWorkerProcess, info: dict) -> None:
        worker.ready = True
        worker.info = info
        self.failed_starts[slot] = 0

    def vacate(self, slot: int, worker: TreeWorkerProcess, reason: str) -> bool:
        """Empty the dead worker's slot; whether the slot may start another (not given up)."""
        self.workers[slot] = None
        if not worker.ready:
            self.failed_starts[slot] += 1
            self.start_errors[slot] = f"{reason} before it was ready"
        return self.failed_starts[slot] < MAX_FAILED_STARTS

    def start_failures(self) -> str:
        return "; ".join(e for e in self.start_errors if e)

    def next_event(self, deadline: float) -> Event:
        try:
            return self.events.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            return None, None

    def pids(self) -> list[int]:
        return [w.pid for w in self if w.alive and w.pid is not None]  # alive: started, so it has a pid

    def kill_overdue(self) -> None:
        """Kill workers that hang: a trial (a CPU trial's fold) past trial_timeout_s, or a start past
        READY_TIMEOUT_S."""
        now = time.monotonic()
        timeout = self.settings.trial_timeout_s
        for w in self:
            if w.kill_reason:
                continue
            if w.task is not None and not w.awaiting_lease and now - w.task_started > timeout:
                w.kill(f"its {w.task.job.model_type} trial {w.task.job.trial_number} ran past "
                       f"tree_trial_timeout_s={timeout:g}")
            elif not w.ready and now - w.started > READY_TIMEOUT_S:
                w.kill(f"not ready within {READY_TIMEOUT_S:g}s of starting")

    def silently_dead(self) -> list[tuple[int, TreeWorkerProcess, bool]]:
        """(slot, worker, outlived SIGKILL) of the workers to handle as dead although their end of stream
        has not come, which would hang the batch."""
        dead = []
        for slot, w in enumerate(self.workers):
            if w is None or w.stdout_closed:
                continue
            now = time.monotonic()
            if w.exited_at is None and not w.alive:
                w.exited_at = now
            exited = w.exited_at is not None and now - w.exited_at > SILENT_DEATH_S
            undead = w.exited_at is None and w.killed_at is not None and now - w.killed_at > SILENT_DEATH_S
            if exited or undead:
                log.warning("%s (pid %d) %s over %gs ago, and its stdout is still open; handling it as dead%s",
                            w.placement.describe(), w.pid, "exited" if exited else "was sent SIGKILL",
                            SILENT_DEATH_S, "" if exited or w.placement.gpu is None else
                            f"; GPU {w.placement.gpu}'s lease stays held until the pool closes")
                dead.append((slot, w, undead))
        return dead

    def kill_all(self) -> set[int | None]:
        """Kill every worker at once and wait for them (bounded); empty every slot. The GPUs of those that
        outlived SIGKILL: their leases must stay held."""
        live = [w for w in self if w.alive]
        for w in live:
            w.child.kill()
        undead = {w.placement.gpu for w in live
                  if not w.child.kill_and_wait(consequence="its GPU's lease stays held until the pool closes")}
        self.workers = [None] * len(self.placements)
        return undead

    def close(self) -> None:
        """Shut every worker down, all at once: each is asked to stop, and any not gone within
        STOP_WAIT_S is killed."""
        workers = list(self)
        for w in workers:
            w.child.ask_to_stop(SHUTDOWN)
        deadline = time.monotonic() + STOP_WAIT_S
        for w in workers:
            w.child.stop(deadline)
        self._finalizer.detach()
