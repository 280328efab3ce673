"""TreeTrialPool: long-lived worker processes, each pinned to a GPU or to CPU cores, and the
scheduling of trials onto them.

Scheduling: a trial of a GPU model type (CatBoost, XGBoost) runs on a GPU worker whenever the pool
has GPUs, LightGBM always on CPU threads. A GPU may have several workers (``xgboost_per_gpu``, see
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

Leases: the pool, not its workers, holds each GPU's lease (lease.py), on behalf of the workers it
sends GPU trials to. It takes the lease before it sends the first GPU trial to that GPU and releases
it as soon as no GPU trial is assigned there, at the end of every batch, and when it closes. So two
pools, or a pool and any other lease holder (an NN worker, the trial CLI), never use one GPU at
once, while the workers of one pool share it. A GPU trial whose lease is not free waits without
blocking the pool (which polls the lease), and fails, naming the holder, after ``lease_timeout_s``;
that GPU then takes no GPU trial for the rest of the batch (the others, or a failure with the same
reason once every GPU is out, take the queued ones).
If the host process dies, the OS frees its leases; its workers watch their parent pid and exit
within a second (orphans.exit_with_parent), so none goes on using a GPU it no longer has.

Faults: a worker that dies mid-trial (segfault, abort, kill) is replaced by a new process with the
same pinning and the folds it owed are retried; the trial's crash number ``trial_retries`` + 1 (on
any of its folds) ends every fold it still owes as "fail" with the reason, and stops the workers still
training its other folds. Crashes count by try: folds of one try that die together (a trial that
crashes its library on every fold, the OOM killer taking several workers) cost the trial one retry. A
fold that raises is a "fail" result sent by the worker, which carries on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import watcher_plugins
from watcher_plugins.devices import pin_environment
from watcher_plugins.errors import ExecutorError, LeaseError
from watcher_plugins.lease import GpuLease
from watcher_plugins.records import STATUS_FAIL, FoldResult, TrialJob
from watcher_plugins.tree_parallel.libraries import (
    GPU_MODEL_TYPES,
    SHARED_GPU_MODEL_TYPES,
    CatBoostFitter,
    is_out_of_gpu_memory,
)
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.worker import TASK_STDERR_MARKER

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
MAX_FAILED_STARTS = 3  # a slot whose process dies this many times before becoming ready is given up
STDERR_TAIL_LINES = 20
LEASE_POLL_S = 0.1  # how often a GPU trial waiting for its lease checks it again
DONE_WAIT_S = 10.0  # at the end of a batch, how long to wait for the workers' "done" after their last fold
STOP_WAIT_S = 10.0  # how long closing waits for the workers asked to stop, all together, before killing them
KILL_WAIT_S = 10.0  # how long a SIGKILLed worker may take to die: longer, it is stuck in the kernel
SILENT_DEATH_S = 10.0  # a worker exited (or SIGKILLed) this long without its end of stream is handled as dead


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


@dataclass(eq=False)
class _Task:
    """A trial in flight: the folds it still owes, those not yet sent to a worker, and its crashes.

    A GPU trial goes to one worker whole (its XGBoost folds train at once, in threads); a CPU trial
    goes out a fold at a time, so that the last trials of a batch spread over every free worker
    instead of running their folds one after another on one worker each."""

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


class _WorkerProcess:
    """One worker process, with threads that turn its stdout into events and keep its stderr's tail."""

    def __init__(self, placement: WorkerPlacement, settings: PoolSettings, events: queue.Queue):
        self.placement = placement
        self.ready = False
        self.task: _Task | None = None
        self.folds: list[int] = []  # the folds of its task sent to it
        self.task_try = 0  # its task's crashes counted when it took the folds: which try of the trial it runs
        self.awaiting_lease = False  # its task is a GPU trial not sent yet: the pool waits for the lease
        self.send_failed = False  # its task could not be written to it: it was dead already, and never had it
        self.retiring = False  # it said it exits after its trial (a GPU fit failed): it gets no more tasks
        self.task_started = 0.0
        self.kill_reason: str | None = None  # why the pool killed it, when it did
        self.killed_at: float | None = None
        self.exited_at: float | None = None  # when the pool first saw its process gone
        self.stdout_closed = False  # its end-of-stream event is queued: its death will be handled from it
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        # stderr since the worker began its current trial (it writes TASK_STDERR_MARKER first), and the
        # CatBoost reserve that trial was sent with: what decides a free retry after out-of-memory.
        self.task_stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.task_catboost_reserve: float | None = None
        self.info: dict = {}
        config = {"placement": placement.to_json(), "rounds": settings.rounds,
                  "early_stopping_rounds": settings.early_stopping_rounds,
                  "xgboost_gpu_fold_threads": settings.xgboost_gpu_fold_threads,
                  "xgboost_gpu_async_pool": settings.xgboost_gpu_async_pool}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher_plugins.tree_parallel.worker", "--config", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # A library's stray non-UTF-8 byte on stderr must not kill the thread that drains it (the worker
            # would block on a full pipe): it is shown escaped instead.
            env=_worker_env(placement), text=True, encoding="utf-8", errors="backslashreplace", bufsize=1,
            close_fds=True,
        )
        self.started = time.monotonic()
        threading.Thread(target=self._read_stdout, args=(events,), daemon=True,
                         name=f"tree-worker-{placement.slot}-stdout").start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True,
                                               name=f"tree-worker-{placement.slot}-stderr")
        self._stderr_reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release_task(self) -> tuple[_Task | None, list[int]]:
        """Free it of its task: the task, and the folds sent to it that still owe a result."""
        task, folds = self.task, self.folds
        self.task, self.folds, self.awaiting_lease, self.send_failed = None, [], False, False
        return task, [f for f in folds if task is not None and f in task.folds]

    def _read_stdout(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            try:
                events.put((self, json.loads(line)))
            except ValueError:
                events.put((self, {"event": "invalid", "line": line.strip()[:200]}))
        self.stdout_closed = True
        events.put((self, None))  # end of stream: the process is gone or going

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip()
            if line.startswith(TASK_STDERR_MARKER):
                self.task_stderr.clear()
            elif line:
                self.stderr_tail.append(line)
                self.task_stderr.append(line)
                log.debug("%s: %s", self.placement.describe(), line)

    def send(self, obj: dict) -> bool:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False  # it died; its end-of-stream event is on its way

    def death_reason(self) -> str:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
        self._stderr_reader.join(timeout=5)  # its last words, before the tail is read
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
        tail = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
        return (f"tree worker pid {self.pid} ({self.placement.describe()}) {how}"
                + (f"; its last stderr line: {tail}" if tail else ""))

    def kill(self, reason: str) -> None:
        """Kill it on purpose; its end-of-stream event then takes the usual worker-death path."""
        if self.proc.poll() is None:
            self.kill_reason = reason
            self.killed_at = time.monotonic()
            self.proc.kill()

    def ask_to_stop(self) -> None:
        """Send it shutdown and close its stdin: an idle worker exits at once."""
        if self.proc.poll() is None:
            self.send({"command": "shutdown"})
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait_stopped(self, deadline: float) -> None:
        """Wait until ``deadline`` (time.monotonic()) for it to exit, then SIGKILL it and wait KILL_WAIT_S
        more: one stuck in the kernel (a hung GPU driver call) is left behind with a warning, not waited
        for forever."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            self.proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not die within %g s of SIGKILL (stuck in the kernel, as in a hung GPU "
                        "driver call); left behind", self.placement.describe(), self.pid, KILL_WAIT_S)


def _worker_env(placement: WorkerPlacement) -> dict[str, str]:
    # The one GPU this worker may see, set before it starts; an empty value hides every GPU from a CPU worker.
    env = pin_environment(dict(os.environ), placement.gpu)
    threads = str(placement.threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = threads  # sized before the OpenMP runtime loads
    package_root = str(Path(watcher_plugins.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_all(procs: list[_WorkerProcess]) -> None:
    for w in procs:
        if w.proc.poll() is None:
            w.proc.kill()


class TreeTrialPool:
    """Long-lived tree worker processes, one per placement, and the batch scheduler over them."""

    def __init__(self, placements: Sequence[WorkerPlacement], settings: PoolSettings):
        if not placements:
            raise ExecutorError("a tree pool needs at least one worker placement")
        if settings.xgboost_per_gpu < 1:
            raise ExecutorError(f"xgboost_per_gpu must be >= 1, got {settings.xgboost_per_gpu}")
        self.placements = list(placements)
        self.settings = settings
        gpus = sorted({p.gpu for p in self.placements if p.gpu is not None})
        self._leases = {gpu: GpuLease(gpu, settings.lease_dir, settings.lease_timeout_s,
                                      purpose=f"tree_parallel pool: GPU trials of its workers on GPU {gpu}")
                        for gpu in gpus}
        self._lease_wait_since: dict[int, float] = {}  # GPU -> when its first waiting trial began to wait
        self._lease_lost: dict[int, str] = {}  # GPU -> why its lease was not had: out for the rest of the batch
        self._stuck_gpus: set[int | None] = set()  # a worker there outlived SIGKILL: lease held until close()
        self._events: queue.Queue = queue.Queue()
        self._workers: list[_WorkerProcess | None] = [None] * len(self.placements)
        self._failed_starts = [0] * len(self.placements)
        self._start_errors: list[str] = [""] * len(self.placements)
        self._finalizer = weakref.finalize(self, _kill_all, [])
        self._gpu_queue: deque[_Task] = deque()
        self._cpu_queue: deque[_Task] = deque()
        self._results: dict[tuple[int, int], FoldResult] = {}
        self._on_result: Callable[[FoldResult], None] | None = None
        self._owed = 0
        # Data (DataRef keys) whose CatBoost GPU fits outgrew the "auto" reserve: their CatBoost trials get
        # CatBoost's default reserve from then on (see _on_worker_death).
        self.catboost_full_reserve: set[str] = set()
        self.restarts = 0  # workers replaced after dying unannounced (crashes, kills)
        self.retirements = 0  # workers replaced after retiring (a fit failed on their GPU)
        self.closed = False

    @property
    def has_gpu(self) -> bool:
        return any(p.gpu is not None for p in self.placements)

    def busy_workers(self) -> list[tuple[int, str, int]]:
        """(pid, model type, trial number) of each worker now training a trial."""
        busy = []
        for w in list(self._workers):  # may be called from another thread: read each field once
            task = w.task if w is not None else None
            if task is not None and not w.awaiting_lease:
                busy.append((w.pid, task.job.model_type, task.job.trial_number))
        return busy

    def leases_held(self) -> list[int]:
        """The GPUs whose lease this pool holds now."""
        return [gpu for gpu, lease in self._leases.items() if lease.is_held]

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w is not None and w.proc.poll() is None]

    # -- process management -------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        worker = _WorkerProcess(self.placements[slot], self.settings, self._events)
        self._workers[slot] = worker
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_all, [w for w in self._workers if w is not None])

    def start(self) -> None:
        """Start every worker and wait until each says it is ready."""
        if self.closed:
            raise ExecutorError("the tree pool is closed")
        for slot, worker in enumerate(self._workers):
            if worker is None:
                self._spawn(slot)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(w is None or w.ready for w in self._workers) and time.monotonic() < deadline:
            self._handle(*self._next_event(deadline))
        if not any(w is not None and w.ready for w in self._workers):
            raise ExecutorError("no tree worker could be started: " + "; ".join(e for e in self._start_errors if e))

    def ping(self) -> list[dict]:
        """Each live worker's self-description (pid, GPU, threads, CUDA_VISIBLE_DEVICES, loaded modules)."""
        self.start()
        live = [w for w in self._workers if w is not None and w.ready]
        for w in live:
            w.info = {}
            w.send({"command": "ping"})
        deadline = time.monotonic() + 30
        while any(not w.info for w in live) and time.monotonic() < deadline:
            self._handle(*self._next_event(deadline))
        return [w.info for w in live]

    def close(self) -> None:
        """Shut every worker down, all at once: each is asked to stop, and any not gone within STOP_WAIT_S
        is killed. Idempotent."""
        if self.closed:
            return
        self.closed = True
        workers = [w for w in self._workers if w is not None]
        for w in workers:
            w.ask_to_stop()
        deadline = time.monotonic() + STOP_WAIT_S
        for w in workers:
            w.wait_stopped(deadline)
        self._finalizer.detach()
        self._release_leases()

    def _next_event(self, deadline: float) -> tuple[_WorkerProcess | None, dict | None]:
        try:
            return self._events.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            return None, None

    # -- scheduling ------------------------------------------------------------------------

    def run(self, jobs: Sequence[TrialJob], on_result: Callable[[FoldResult], None] | None = None
            ) -> list[FoldResult]:
        """Train every job on every fold; ``on_result`` is called (in this thread) as each fold ends."""
        self.start()
        tasks = [_Task(i, job, list(range(job.folds)), list(range(job.folds)),
                       self.has_gpu and job.model_type in GPU_MODEL_TYPES)
                 for i, job in enumerate(jobs)]
        self._gpu_queue = deque(t for t in tasks if t.on_gpu)
        self._cpu_queue = deque(t for t in tasks if not t.on_gpu)
        self._results: dict[tuple[int, int], FoldResult] = {}
        self._on_result = on_result
        self._owed = sum(job.folds for job in jobs)
        self._lease_lost = {}
        try:
            while self._owed > 0:
                self._poll_leases()  # first: the workers of trials it fails are free for _dispatch
                self._dispatch()
                self._release_idle_leases()
                if not any(w is not None and w.task is not None for w in self._workers):
                    self._fail_unplaceable()
                    if self._owed == 0:
                        break
                waiting = any(w is not None and w.awaiting_lease for w in self._workers)
                self._handle(*self._next_event(time.monotonic() + (LEASE_POLL_S if waiting else 1.0)))
                self._kill_overdue()
                self._notice_silent_deaths()
            # Every fold has its result. A worker sends "done" right after its last fold: take those in,
            # so that no trial of this batch still counts as on its GPU when the next batch starts.
            deadline = time.monotonic() + DONE_WAIT_S
            while time.monotonic() < deadline and any(w is not None and w.task is not None for w in self._workers):
                self._handle(*self._next_event(deadline))
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, a callback that raised): workers may be mid-trial, and
            # their answers would belong to no batch. Kill them; the next batch starts fresh ones.
            live = [w for w in self._workers if w is not None and w.proc.poll() is None]
            for w in live:
                w.proc.kill()
            undead = set()
            for w in live:  # dead before their GPUs' leases are free
                try:
                    w.proc.wait(timeout=KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) did not die within %g s of SIGKILL; its GPU's lease stays held "
                                "until the pool closes", w.placement.describe(), w.pid, KILL_WAIT_S)
                    undead.add(w.placement.gpu)
            self._workers = [None] * len(self.placements)
            self._stuck_gpus |= undead
            self._release_leases(keep=self._stuck_gpus)
            raise
        self._release_leases(keep=self._stuck_gpus)
        return [self._results[(t.index, f)] for t in tasks for f in range(t.job.folds)]

    def _dispatch(self) -> None:
        for w in self._workers:
            if w is None or not w.ready or w.retiring or w.task is not None:
                continue
            if w.stdout_closed or w.proc.poll() is not None:
                continue  # died idle (between batches, say): its death is handled from its event, not a trial's
            task = self._next_gpu_task(w.placement.gpu) if w.placement.gpu is not None else None
            if task is None and self._cpu_queue:
                task = self._cpu_queue[0]
            if task is None:
                continue
            w.task, w.folds, w.task_try = task, task.take(one_fold=not task.on_gpu), len(task.crashes)
            if not task.pending and self._cpu_queue and self._cpu_queue[0] is task:
                self._cpu_queue.popleft()
            if task.on_gpu and not self._lease_now(w.placement.gpu):
                w.awaiting_lease = True  # sent by _poll_leases once the pool holds the lease
            else:
                self._send_task(w)

    def _next_gpu_task(self, gpu: int) -> _Task | None:
        """The GPU trial a free worker on ``gpu`` may start now, taken off the queue, or None."""
        if not self._gpu_queue or gpu in self._lease_lost:
            return None
        on_gpu = self._gpu_tasks(gpu)
        if not on_gpu:
            return self._gpu_queue.popleft()
        if (len(on_gpu) >= self.settings.xgboost_per_gpu
                or any(t.job.model_type not in SHARED_GPU_MODEL_TYPES for t in on_gpu)):
            return None  # full, or a CatBoost trial owns the GPU
        for i, task in enumerate(self._gpu_queue):
            if task.job.model_type in SHARED_GPU_MODEL_TYPES:
                del self._gpu_queue[i]
                return task
        return None

    def _gpu_tasks(self, gpu: int) -> list[_Task]:
        """The GPU trials assigned to the workers on ``gpu``: training, or waiting for its lease."""
        return [w.task for w in self._workers
                if w is not None and w.task is not None and w.task.on_gpu and w.placement.gpu == gpu]

    def _send_task(self, w: _WorkerProcess) -> None:
        w.awaiting_lease = False
        w.task_started = time.monotonic()
        w.task_catboost_reserve = self._catboost_reserve(w.task.job)
        w.task_stderr.clear()  # and again when its marker comes: a late line of the last trial may come first
        # A worker that died since _dispatch looked never gets the trial: its death is not the trial's crash.
        w.send_failed = not w.send({"command": "train", "job": w.task.job.to_json(), "folds": list(w.folds),
                                    "catboost_gpu_ram_part": w.task_catboost_reserve})

    def _catboost_reserve(self, job: TrialJob) -> float | None:
        """The GPU memory share a CatBoost fit of ``job`` reserves: the setting, or for "auto" (None)
        CatBoost's default once this job's data has been seen to need it."""
        if self.settings.catboost_gpu_ram_part is None and job.data.key in self.catboost_full_reserve:
            return CatBoostFitter.DEFAULT_GPU_RAM_PART
        return self.settings.catboost_gpu_ram_part

    def _outgrew_auto_reserve(self, task: _Task, worker: _WorkerProcess) -> bool:
        """Whether a worker died because a CatBoost GPU fit ran out of the "auto" reserve. CatBoost
        raises its out-of-memory error on a thread of its own, which aborts the process (seen on an
        H200), so the worker cannot retry it itself: the pool retries the trial with CatBoost's default
        reserve, and that retry is not counted against trial_retries (the reserve was ours to pick)."""
        return (task.job.model_type == "catboost" and task.on_gpu and worker.task_catboost_reserve is None
                and not worker.kill_reason and any(is_out_of_gpu_memory(line) for line in worker.task_stderr))

    # -- GPU leases (held by this process for its workers) -------------------------------------

    def _lease_now(self, gpu: int) -> bool:
        """Whether the pool holds ``gpu``'s lease, taking it if it is free; never waits."""
        lease = self._leases[gpu]
        if lease.is_held:
            return True
        if gpu not in self._lease_wait_since:
            try:
                if lease.try_acquire():
                    return True
            except LeaseError:
                pass  # _poll_leases meets it again and fails the waiting trials with it
        self._lease_wait_since.setdefault(gpu, time.monotonic())
        return False

    def _poll_leases(self) -> None:
        """Start the trials waiting for a lease that is free now; fail those that waited past the timeout."""
        for gpu, since in list(self._lease_wait_since.items()):
            waiting = [w for w in self._workers if w is not None and w.awaiting_lease and w.placement.gpu == gpu]
            error = None
            if waiting:
                try:
                    if self._leases[gpu].try_acquire():
                        for w in waiting:
                            self._send_task(w)
                        waiting = []
                    elif time.monotonic() - since >= self.settings.lease_timeout_s:
                        error = str(self._leases[gpu].timeout_error())
                except LeaseError as exc:  # the lease directory cannot be created, say
                    error = str(exc)
            if error is not None:
                for w in waiting:  # never sent: the worker is free again
                    task, _ = w.release_task()
                    self._fail_task(task, error)
                # The GPU is out for the rest of the batch: its queued trials go to the other GPUs, or
                # fail now with the same reason, rather than each waiting lease_timeout_s again.
                self._lease_lost[gpu] = error
                if set(self._lease_lost) >= set(self._leases):
                    while self._gpu_queue:
                        self._fail_task(self._gpu_queue.popleft(), "; ".join(self._lease_lost.values()))
            if not waiting or error is not None:
                del self._lease_wait_since[gpu]

    def _release_idle_leases(self) -> None:
        for gpu, lease in self._leases.items():
            if lease.is_held and not self._gpu_tasks(gpu) and gpu not in self._stuck_gpus:
                lease.release()

    def _release_leases(self, keep: set[int | None] = frozenset()) -> None:
        self._lease_wait_since.clear()
        for gpu, lease in self._leases.items():
            if gpu not in keep:
                lease.release()

    def _kill_overdue(self) -> None:
        """Kill workers that hang: a trial (a CPU trial's fold) past trial_timeout_s, or a start past
        READY_TIMEOUT_S."""
        now = time.monotonic()
        for w in self._workers:
            if w is None or w.kill_reason:
                continue
            if w.task is not None and not w.awaiting_lease and now - w.task_started > self.settings.trial_timeout_s:
                w.kill(f"its {w.task.job.model_type} trial {w.task.job.trial_number} ran past "
                       f"tree_trial_timeout_s={self.settings.trial_timeout_s:g}")
            elif not w.ready and now - w.started > READY_TIMEOUT_S:
                w.kill(f"not ready within {READY_TIMEOUT_S:g}s of starting")

    def _notice_silent_deaths(self) -> None:
        """Handle as dead the workers whose end of stream does not come, which would hang the batch: one
        that exited while a process it forked still holds its pipes, or one that outlived SIGKILL."""
        for slot, w in enumerate(self._workers):
            if w is None or w.stdout_closed:
                continue
            now = time.monotonic()
            if w.exited_at is None and w.proc.poll() is not None:
                w.exited_at = now
            exited = w.exited_at is not None and now - w.exited_at > SILENT_DEATH_S
            undead = w.exited_at is None and w.killed_at is not None and now - w.killed_at > SILENT_DEATH_S
            if exited or undead:
                log.warning("%s (pid %d) %s over %gs ago, and its stdout is still open; handling it as dead%s",
                            w.placement.describe(), w.pid, "exited" if exited else "was sent SIGKILL",
                            SILENT_DEATH_S, "" if exited or w.placement.gpu is None else
                            f"; GPU {w.placement.gpu}'s lease stays held until the pool closes")
                if undead:
                    self._stuck_gpus.add(w.placement.gpu)
                self._on_worker_death(slot, w)

    def _fail_unplaceable(self) -> None:
        """Nothing is running: whatever is still queued has no live worker that could take it."""
        # A worker starting, or retiring (its replacement starts when its exit is seen), will take them.
        starting = any(w is not None and (not w.ready or w.retiring) for w in self._workers)
        if starting:
            return
        reason = "; ".join(e for e in self._start_errors if e) or "no live worker can run it"
        for q in (self._gpu_queue, self._cpu_queue):
            while q:
                self._fail_task(q.popleft(), f"no tree worker left to run this trial: {reason}")

    def _record(self, result: FoldResult, task: _Task) -> None:
        key = (task.index, result.fold_idx)
        if key in self._results or result.fold_idx not in task.folds:
            return  # a late duplicate can never count twice
        task.folds.remove(result.fold_idx)
        self._results[key] = result
        self._owed -= 1
        if self._on_result is not None:
            self._on_result(result)

    def _fail_task(self, task: _Task, reason: str) -> None:
        """Every fold the trial still owes ends as "fail"; workers training its other folds are stopped
        (their work is for a trial given up, and would keep them from the next ones)."""
        task.pending = []
        for q in (self._gpu_queue, self._cpu_queue):
            if task in q:
                q.remove(task)
        for w in self._workers:
            if w is not None and w.task is task and not w.awaiting_lease and not w.kill_reason:
                w.kill(f"its {task.job.model_type} trial {task.job.trial_number} failed on another worker")
        self._fail_folds(task, task.folds, reason)

    def _fail_folds(self, task: _Task, folds: Sequence[int], reason: str) -> None:
        for fold_idx in list(folds):
            self._record(FoldResult(task.job.trial_number, fold_idx, task.job.model_type, None, 0.0, STATUS_FAIL,
                                    error=reason, info={"attempts": task.attempts}), task)

    def _requeue(self, task: _Task, folds: Sequence[int], same_try: bool = False) -> None:
        """``folds`` of ``task`` go back to the front of its queue. Unless they go back within the same
        try, the trial counts as out again only when a worker takes them (a crash that sent them back is
        counted by the caller)."""
        if not same_try:
            task.sent = False
        task.give_back(folds)
        queue = self._gpu_queue if task.on_gpu else self._cpu_queue
        if task not in queue:
            queue.appendleft(task)

    def _handle(self, worker: _WorkerProcess | None, msg: dict | None) -> None:
        if worker is None or worker not in self._workers:
            return  # a timeout, or a stale event from a process already replaced
        slot = self._workers.index(worker)
        if msg is None:
            self._on_worker_death(slot, worker)
            return
        event = msg.get("event")
        if event == "ready":
            worker.ready = True
            worker.info = msg
            self._failed_starts[slot] = 0
        elif event == "pong":
            worker.info = msg
        elif event == "fold" and worker.task is not None:
            self._record(FoldResult.from_json(msg["result"]), worker.task)
        elif event == "done" and worker.task is not None:
            worker.retiring = bool(msg.get("retiring"))  # its exit follows; the slot restarts then
            task, owed = worker.release_task()
            if owed:  # cannot happen with a sound worker; never leave a fold without a result
                self._fail_folds(task, owed, f"{worker.placement.describe()} ended the trial without results")
        elif event in ("invalid", "error"):
            log.warning("%s sent %s", worker.placement.describe(), msg)
            if event == "invalid":  # its protocol stream is corrupt: replace it
                worker.proc.kill()

    def _on_worker_death(self, slot: int, worker: _WorkerProcess) -> None:
        reason = worker.death_reason()
        never_sent = worker.awaiting_lease or worker.send_failed
        task, lost = worker.release_task()
        self._workers[slot] = None
        if not worker.ready:
            self._failed_starts[slot] += 1
            self._start_errors[slot] = f"{reason} before it was ready"
        if task is not None and never_sent:  # not an attempt
            self._requeue(task, lost)
        elif lost and self._outgrew_auto_reserve(task, worker):
            log.warning("%s during catboost trial %d: its GPU memory reserve (catboost_gpu_ram_part auto) was "
                        "too small; CatBoost trials on this data now reserve %s", reason, task.job.trial_number,
                        CatBoostFitter.DEFAULT_GPU_RAM_PART)
            self.catboost_full_reserve.add(task.job.data.key)
            self._requeue(task, lost)
        elif lost and worker.task_try < len(task.crashes):
            # A fold of a try already counted as crashed: several of its folds died at once (a trial that
            # crashes its library on every fold, the OOM killer taking several workers). One try, one crash.
            log.warning("%s during %s trial %d, in a try already counted as crashed; its folds %s go back",
                        reason, task.job.model_type, task.job.trial_number, lost)
            self._requeue(task, lost, same_try=True)
        elif lost:
            task.crashes.append(reason)  # a crash on any of a trial's folds counts against the trial
            if len(task.crashes) <= self.settings.trial_retries:
                log.warning("%s during %s trial %d; retrying (attempt %d of %d)", reason, task.job.model_type,
                            task.job.trial_number, len(task.crashes) + 1, self.settings.trial_retries + 1)
                self._requeue(task, lost)
            else:
                task.sent = False
                self._fail_task(task, f"{reason} during {task.job.model_type} trial {task.job.trial_number}; "
                                      f"gave up after {task.attempts} attempt(s)")
        if self.closed or self._failed_starts[slot] >= MAX_FAILED_STARTS:
            return
        if worker.retiring:
            self.retirements += 1  # it said it would exit after a failed GPU fit: not a crash
            log.info("%s retired after a fit failed on its GPU; a fresh worker takes its place",
                     worker.placement.describe())
        else:
            self.restarts += 1
        self._spawn(slot)
