"""A pool's refits (TreeTrialPool.refit): each model type's best trial refit in a worker, as its trials ran.

Each RefitJob goes whole to one worker ("refit" in the worker protocol; trial.run_refit does the work):
the trial's folds again, then the fit on every row, saved in the job's model_dir. Where it runs follows
the trials' rules, so that its folds are the study's very fits (a GPU fit is not a CPU fit): a GPU model
type (CatBoost, XGBoost) in a pool with GPUs on a GPU worker, while the pool holds that GPU's lease,
one refit at a time on each GPU (a CatBoost fit has its GPU to itself); LightGBM (and everything in a
CPU pool) on any free worker, CPU workers first. Refits of different model types run at once on
different workers.

A refit whose worker dies or refuses the request, or that runs past ``trial_timeout_s`` times its folds
plus one, fails; there are no retries (the studies' results stand without a saved model), except the
one a CatBoost GPU fit gets when it outgrew the "auto" memory reserve (retry.py): it runs again with
CatBoost's default reserve. The worker leaves its oof and predictions in an npz file in the job's
model_dir (trial.REFIT_ARRAYS), read here and removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from watcher_plugins.child_process import BadLine
from watcher_plugins.records import STATUS_FAIL, RefitJob, RefitResult
from watcher_plugins.tree_parallel.leases import LEASE_POLL_S
from watcher_plugins.tree_parallel.libraries import GPU_MODEL_TYPES, is_out_of_gpu_memory
from watcher_plugins.tree_parallel.trial import load_refit_arrays

if TYPE_CHECKING:
    from watcher_plugins.tree_parallel.pool import TreeTrialPool
    from watcher_plugins.tree_parallel.slots import TreeWorkerProcess

log = logging.getLogger(__name__)


@dataclass
class _Running:
    index: int  # the job's position
    started: float
    on_gpu: bool
    catboost_reserve: float | None
    retried_reserve: bool


class RefitRun:
    """One call of TreeTrialPool.refit: its queue, the refits running and the results."""

    def __init__(self, pool: TreeTrialPool, jobs: Sequence[RefitJob]):
        self.pool = pool
        self.jobs = list(jobs)
        self.queue: list[int] = list(range(len(self.jobs)))
        self.running: dict[TreeWorkerProcess, _Running] = {}
        self.results: dict[int, RefitResult] = {}
        self.reserve_retried: set[int] = set()

    def on_gpu(self, index: int) -> bool:
        return self.pool.has_gpu and self.jobs[index].trial.model_type in GPU_MODEL_TYPES

    def run(self) -> list[RefitResult]:
        pool = self.pool
        pool.start()
        pool.leases.new_batch()
        try:
            while self.queue or self.running:
                self._poll_leases()
                self._dispatch()
                pool.leases.release_idle(self._gpu_busy)
                self._fail_unplaceable()
                if not self.queue and not self.running:
                    break
                waiting = any(self.on_gpu(i) for i in self.queue)
                self._handle(*pool.slots.next_event(time.monotonic() + (LEASE_POLL_S if waiting else 1.0)))
                self._kill_overdue()
                for slot, worker, undead in pool.slots.silently_dead():
                    if undead:
                        pool.leases.stuck.add(worker.placement.gpu)
                    self._died(worker)
                    pool._on_worker_death(slot, worker)
        except BaseException:
            # Interrupted (Ctrl-C): the workers may be mid-refit. Kill them, dead before their GPUs' leases
            # are free, as an interrupted batch does.
            pool.leases.stuck |= pool.slots.kill_all()
            pool.leases.release(keep=pool.leases.stuck)
            raise
        pool.leases.release(keep=pool.leases.stuck)
        return [self.results[i] for i in range(len(self.jobs))]

    def _fail(self, index: int, error: str) -> None:
        trial = self.jobs[index].trial
        self.results[index] = RefitResult(trial.model_type, trial.trial_number, STATUS_FAIL, error=error)

    def _gpu_busy(self, gpu: int) -> bool:
        return any(r.on_gpu and w.placement.gpu == gpu for w, r in self.running.items())

    def _free_workers(self) -> list[TreeWorkerProcess]:
        return [w for w in self.pool.slots if w.ready and not w.retiring and w.task is None and w not in self.running
                and w.alive and not w.stdout_closed]

    def _poll_leases(self) -> None:
        """Take the leases GPU refits wait for, where free; fail them all once every GPU's wait timed out."""
        leases = self.pool.leases
        wanted = any(self.on_gpu(i) for i in self.queue)
        leases.poll(lambda gpu: wanted and not self._gpu_busy(gpu))
        if wanted and leases.all_lost:
            reason = "; ".join(leases.lost.values())
            for index in [i for i in self.queue if self.on_gpu(i)]:
                self.queue.remove(index)
                self._fail(index, f"no GPU to refit it on: {reason}")

    def _dispatch(self) -> None:
        leases = self.pool.leases
        for index in list(self.queue):
            free = self._free_workers()
            if self.on_gpu(index):
                gpus = [(w, w.placement.gpu) for w in free if w.placement.gpu is not None]
                chosen = next((w for w, gpu in gpus if gpu not in leases.lost and not self._gpu_busy(gpu)
                               and leases.now(gpu)), None)
            else:
                chosen = min(free, key=lambda w: w.placement.gpu is not None, default=None)  # CPU workers first
            if chosen is not None:
                self._send(chosen, index)

    def _send(self, worker: TreeWorkerProcess, index: int) -> None:
        job = self.jobs[index]
        reserve = self.pool.retry.catboost_reserve(job.trial)
        self.queue.remove(index)
        worker.task_stderr.clear()
        if worker.send({"command": "refit", "job": job.to_json(), "catboost_gpu_ram_part": reserve}):
            self.running[worker] = _Running(index, time.monotonic(), self.on_gpu(index), reserve,
                                            index in self.reserve_retried)
        else:  # it died since it was found free: its death comes as an event; the job waits for another
            self.queue.insert(0, index)

    def _fail_unplaceable(self) -> None:
        """Queued refits that no worker, live or starting, could ever take fail now."""
        slots = self.pool.slots
        for index in list(self.queue):
            gpu = self.on_gpu(index)
            if any(not gpu or (w.placement.gpu is not None and w.placement.gpu not in self.pool.leases.lost)
                   for w in slots):
                continue
            self.queue.remove(index)
            reason = slots.start_failures() or "no live worker can run it"
            self._fail(index, f"no tree worker left to refit it: {reason}")

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for worker, running in self.running.items():
            trial = self.jobs[running.index].trial
            limit = self.pool.settings.trial_timeout_s * (trial.folds + 1)
            if not worker.kill_reason and now - running.started > limit:
                worker.kill(f"its {trial.model_type} refit of trial {trial.trial_number} ran past {limit:g}s "
                            f"(tree_trial_timeout_s x (folds + 1))")

    def _died(self, worker: TreeWorkerProcess) -> None:
        """A worker running a refit is gone: the refit fails, or runs again once with CatBoost's default
        reserve where a GPU fit outgrew the "auto" one."""
        running = self.running.pop(worker, None)
        if running is None:
            return
        trial = self.jobs[running.index].trial
        reason = worker.death_reason()
        if (trial.model_type == "catboost" and running.on_gpu and running.catboost_reserve is None
                and not worker.kill_reason and not running.retried_reserve
                and any(is_out_of_gpu_memory(line) for line in worker.task_stderr)):
            log.warning("%s during catboost refit of trial %d: its GPU memory reserve (catboost_gpu_ram_part auto) "
                        "was too small; refitting with CatBoost's default", reason, trial.trial_number)
            self.pool.retry.catboost_full_reserve.add(trial.data.key)
            self.reserve_retried.add(running.index)
            self.queue.insert(0, running.index)
            return
        self._fail(running.index, f"{reason} during the refit of {trial.model_type} trial {trial.trial_number}")

    def _handle(self, worker: TreeWorkerProcess | None, msg: dict | BadLine | None) -> None:
        running = self.running.get(worker) if worker is not None else None
        if running is not None and worker is not None and isinstance(msg, dict):
            if msg["event"] == "refit":
                del self.running[worker]
                worker.retiring = worker.retiring or msg["retiring"]  # its exit follows; the slot restarts then
                result = RefitResult.from_json(msg["result"])
                if msg["arrays"]:
                    try:
                        result = load_refit_arrays(result, msg["arrays"])
                    except (OSError, ValueError, KeyError) as exc:
                        result.status, result.error = STATUS_FAIL, f"cannot read the refit's predictions: {exc}"
                self.results[running.index] = result
                return
            if msg["event"] == "error":  # it refused the request: never refit
                log.warning("%s refused a request: %s: %s", worker.placement.describe(), msg["code"], msg["message"])
                del self.running[worker]
                self._fail(running.index, f"{worker.placement.describe()} refused the refit's request: "
                                          f"{msg['code']}: {msg['message']}")
                return
        if running is not None and worker is not None and msg is None:
            self._died(worker)
        self.pool._handle(worker, msg)
