"""The nn_batch executor: sends each batch's fits to one worker process per GPU (one CPU worker where
there is no GPU), collects one FoldResult per fold, replaces crashed workers and retries their fits;
refits a best trial on the first device's worker (nn_batch/refit.py).

The host process never imports torch: the workers do the torch work and speak JSON lines.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from watcher_plugins.errors import ProtocolError, WorkerCrashed
from watcher_plugins.executor import Executor, ResultCallback, RunContext
from watcher_plugins.nn_batch import protocol
from watcher_plugins.nn_batch.client import (
    WorkerProcess,
    load_refit_arrays,
    refit_request,
    train_batch_request,
)
from watcher_plugins.nn_batch.protocol import BatchSettings, FitJob, parse_job
from watcher_plugins.records import STATUS_FAIL, FoldResult, RefitJob, RefitResult, TrialJob
from watcher_plugins.settings import ExecutorSettings

Key = tuple[int, int]


@dataclass(frozen=True)
class NNBatchSettings(ExecutorSettings):
    """nn_batch's params (schemas/nn_batch.params.schema.json states their defaults)."""

    schema_ref: ClassVar[str] = "watcher_plugins.schemas:nn_batch.params.schema.json"
    persistent_workers: bool
    n_concurrent_nn: int | str
    nn_strategy: str
    precision: str
    nn_max_epochs: int
    nn_patience: int
    nn_worker_silence_timeout_s: float
    vram_budget_fraction: float


def fit_jobs(job: TrialJob) -> list[FitJob]:
    """One FitJob per fold of a trial; ProtocolError if the trial's params are not a valid NN trial."""
    return [parse_job({"trial_number": job.trial_number, "fold_idx": fold, "folds": job.folds, "seed": job.seed,
                       "params": job.params, "data": job.data.to_json(), "metric": job.metric}, path="$")
            for fold in range(job.folds)]


def within_line_limit(fits: list[FitJob], settings: BatchSettings) -> list[FitJob]:
    """The longest run of whole trials from the start of ``fits`` whose train_batch request stays
    within the worker's line limit (the rest goes in later requests); at least one trial."""
    room = protocol.MAX_LINE_BYTES - len(json.dumps(train_batch_request([], settings))) - 64
    taken: list[FitJob] = []
    for _, group in itertools.groupby(fits, key=lambda fit: fit.trial_number):
        trial = list(group)
        room -= sum(len(json.dumps(fit.to_json())) + 2 for fit in trial)  # ", " between jobs
        if taken and room < 0:
            break
        taken += trial
    return taken


@dataclass(frozen=True)
class _Progress:
    """A slot's fits done of its share of the running batch, in fits: its earlier requests' finished
    fits, plus its current request's share done (its progress line's fraction_done) times its fits."""

    slot: int
    fits_done: float


class _WorkerSlot:
    """One GPU's (or the CPU's) worker, started when first needed and replaced when it crashes."""

    def __init__(self, gpu: int | None, context: RunContext, closing: threading.Event):
        self.gpu = gpu
        self.context = context
        self.closing = closing
        self.worker: WorkerProcess | None = None
        self.starting = False  # its worker is starting: waiting for its GPU lease or its first reply

    def ensure_started(self) -> WorkerProcess:
        if self.closing.is_set():
            # The executor is closing (an interrupt): the worker we lost is not replaced.
            raise WorkerCrashed("the nn_batch executor is closing: no new worker is started")
        if self.worker is None or not self.worker.alive:
            logs = Path(self.context.output_dir) / "logs"
            name = f"nn_worker-gpu{self.gpu}.log" if self.gpu is not None else "nn_worker-cpu.log"
            # Kept in the slot while it starts, so that close() can kill it there: a worker still
            # waiting for its lease must not go on to train once the executor is closed. One killed
            # before its process exists never starts (WorkerProcess.kill).
            worker = WorkerProcess(self.gpu, self.context.lease_dir, self.context.lease_timeout_s, logs / name)
            self.worker = worker
            self.starting = True
            try:
                worker.start()
            finally:
                self.starting = False
            if self.closing.is_set():
                # close() may have cleared self.worker already: the one to kill is the one started here.
                worker.kill()
                self.worker = None
                raise WorkerCrashed("the nn_batch executor closed while its worker started")
        return self.worker

    def discard(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.kill()

    def shutdown(self) -> None:
        """Stop the worker: ask a ready one to shut down, kill one still starting."""
        if self.starting:
            self.discard()
            return
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.shutdown()


def shutdown_slots(slots: Sequence[_WorkerSlot]) -> None:
    """Stop every slot's worker at once: each may take SHUTDOWN_WAIT_S to finish a busy batch, and one
    after another that would be minutes on eight GPUs, after a Ctrl-C."""
    threads = [threading.Thread(target=slot.shutdown, name=f"nn-shutdown-{slot.gpu}", daemon=True)
               for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class NNBatchExecutor(Executor):
    def __init__(self, params: Mapping[str, Any], context: RunContext):
        super().__init__(params, context)
        options = NNBatchSettings.from_params(params)
        self.settings = BatchSettings(
            n_concurrent=options.n_concurrent_nn, strategy=options.nn_strategy, precision=options.precision,
            max_epochs=options.nn_max_epochs, patience=options.nn_patience,
            vram_budget_fraction=float(options.vram_budget_fraction))
        self.persistent = options.persistent_workers
        # A worker reports every finished fit; silence this long means it is wedged, not busy.
        self.silence_timeout_s = float(options.nn_worker_silence_timeout_s)
        devices: list[int | None] = list(context.devices) or [None]
        self._closing = threading.Event()
        self._slots = [_WorkerSlot(gpu, context, self._closing) for gpu in devices]
        self._threads: list[threading.Thread] = []
        #: The closing line of each worker's last batch (strategy, concurrency, OOM retries, seconds).
        self.last_batch_summaries: list[dict] = []

    def run_batch(self, jobs: Sequence[TrialJob], on_result: ResultCallback | None = None) -> list[FoldResult]:
        # Results are keyed by (trial number, fold): a worker reports them so. A second job with a trial
        # number already in the batch fails rather than sharing (and so losing) the first one's results.
        results: dict[Key, FoldResult] = {}
        refused: dict[tuple[int, int], FoldResult] = {}  # (job index, fold) of jobs that never reach a worker
        shares: list[list[FitJob]] = [[] for _ in self._slots]
        seen: set[int] = set()
        for i, job in enumerate(jobs):
            try:
                if job.model_type != "nn":
                    raise ProtocolError("invalid_job", f"model type {job.model_type!r}: nn_batch runs 'nn' trials only")
                if job.trial_number in seen:
                    raise ProtocolError("invalid_job", f"trial {job.trial_number} appears more than once in this batch")
                fits = fit_jobs(job)
                shares[len(seen) % len(self._slots)] += fits  # whole trials, dealt round-robin to the GPUs
                seen.add(job.trial_number)
            except ProtocolError as exc:
                for fold in range(job.folds):
                    refused[(i, fold)] = FoldResult(job.trial_number, fold, job.model_type, None, 0.0,
                                                    STATUS_FAIL, f"invalid trial: {exc}")
        for result in refused.values():
            if on_result is not None:
                on_result(result)

        replies: queue.Queue = queue.Queue()
        self.last_batch_summaries = []
        threads = [threading.Thread(target=self._serve_slot_safely, args=(slot, share, replies, n), daemon=True)
                   for n, (slot, share) in enumerate(zip(self._slots, shares)) if share]
        self._threads = threads
        for thread in threads:
            thread.start()
        expected = sum(len(share) for share in shares)
        batch_fits = expected  # expected counts down
        fits_done: dict[int, float] = {}
        while expected:
            result = replies.get()
            if isinstance(result, _Progress):
                # Summed over the slots, from this thread alone; never back (a crashed request's retry).
                fits_done[result.slot] = max(fits_done.get(result.slot, 0.0), result.fits_done)
                self.report_progress(min(1.0, sum(fits_done.values()) / batch_fits))
                continue
            if isinstance(result, dict):
                self.last_batch_summaries.append(result)
                continue
            expected -= 1
            results[(result.trial_number, result.fold_idx)] = result
            if on_result is not None:
                on_result(result)  # from this thread alone: callers need no locking
        for thread in threads:
            thread.join()
        while not replies.empty():  # closing lines that came after the last result
            self.last_batch_summaries.append(replies.get())
        if not self.persistent:
            self.close()
        return [refused.get((i, fold)) or results[(job.trial_number, fold)]
                for i, job in enumerate(jobs) for fold in range(job.folds)]

    def _serve_slot_safely(self, slot: _WorkerSlot, fits: list[FitJob], replies: queue.Queue, index: int = 0) -> None:
        """_serve_slot, and if it breaks (a bug), every fit it had not reported fails rather than hangs the batch."""
        reported: set[Key] = set()

        class _Tracking(queue.Queue):
            def put(self, item, *args, **kwargs):
                if isinstance(item, FoldResult):
                    reported.add((item.trial_number, item.fold_idx))
                replies.put(item)

        try:
            self._serve_slot(slot, fits, _Tracking(), index)
        except Exception as exc:  # noqa: BLE001 - turned into results, never lost
            slot.discard()
            for fit in fits:
                if fit.key not in reported:
                    replies.put(FoldResult(fit.trial_number, fit.fold_idx, "nn", None, 0.0, STATUS_FAIL,
                                           f"nn_batch executor error: {type(exc).__name__}: {exc}"))

    def _serve_slot(self, slot: _WorkerSlot, fits: list[FitJob], replies: queue.Queue, index: int = 0) -> None:
        """Run ``fits`` on one slot's worker until each has a result; put results on ``replies``, and the
        worker's progress lines as _Progress of slot ``index``."""
        pending: dict[Key, FitJob] = {fit.key: fit for fit in fits}
        attempts: dict[Key, int] = dict.fromkeys(pending, 0)
        # The trials of a request whose worker crashed: any of them may have caused it, so each then runs
        # alone, and a fit fails (its retries used) only after a crash of a request of its trial alone. One
        # trial that kills workers thus fails alone, with trial_retries 0 too.
        suspects: set[int] = set()

        def finish(key: Key, status: str, error: str) -> None:
            fit = pending.pop(key)
            replies.put(FoldResult(fit.trial_number, fit.fold_idx, "nn", None, 0.0, status, error))

        while pending:
            suspect = next((fit.trial_number for fit in pending.values() if fit.trial_number in suspects), None)
            if suspect is not None:
                batch = [fit for fit in pending.values() if fit.trial_number == suspect]
            else:
                batch = within_line_limit(list(pending.values()), self.settings)
            try:
                worker = slot.ensure_started()
            except WorkerCrashed as exc:
                for key in list(pending):
                    finish(key, STATUS_FAIL, str(exc))
                return
            try:
                worker.send(train_batch_request(batch, self.settings))
                reported = 0
                before = len(fits) - len(pending)  # this slot's fits done before this request
                while True:
                    reply = worker.next_reply(timeout=self.silence_timeout_s)
                    event = reply.get("event")
                    if event == "progress":
                        replies.put(_Progress(index, before + float(reply["fraction_done"]) * len(batch)))
                    elif event == "result":
                        reported += 1
                        key = (reply["trial_number"], reply["fold_idx"])
                        if key in pending:
                            pending.pop(key)
                            replies.put(self._fold_result(reply, worker))
                    elif event == "batch_done":
                        replies.put({**reply, "worker": worker.label})
                        break
                    elif event == "error":  # nothing more of this request will run
                        if reply.get("code") == protocol.E_INTERNAL:  # it broke, perhaps after some results
                            reason = (f"the NN worker's batch failed after {reported} of its {len(batch)} fits "
                                      f"had a result: {reply.get('code')}: {reply.get('message')}")
                        else:  # it was refused before any fit ran
                            reason = f"NN worker refused the batch: {reply.get('code')}: {reply.get('message')}"
                        for fit in batch:
                            if fit.key in pending:
                                finish(fit.key, STATUS_FAIL, reason)
                        break
                for fit in batch:  # a closing line without a fit's result is a worker bug, never a hang
                    if fit.key in pending:
                        finish(fit.key, STATUS_FAIL, "the NN worker closed the batch without a result for this fold")
            except WorkerCrashed as exc:
                slot.discard()
                unfinished = [fit for fit in batch if fit.key in pending]
                trials = {fit.trial_number for fit in unfinished}
                for fit in unfinished:
                    attempts[fit.key] += 1
                if len(trials) > 1:
                    suspects |= trials
                    continue
                for fit in unfinished:
                    if attempts[fit.key] > self.context.trial_retries:
                        finish(fit.key, STATUS_FAIL,
                               f"{exc} (tried {attempts[fit.key]} times, trial_retries={self.context.trial_retries})")

    def refit(self, jobs: Sequence[RefitJob]) -> list[RefitResult]:
        """Each job on the first device's worker, one after another (records.RefitJob; the worker's side is
        nn_batch/refit.py): its folds train again with the study's settings, then one fit on every row is
        saved in the job's model_dir. A worker that crashes, goes silent or refuses fails that refit (no
        retries: the studies' results stand without a saved model)."""
        results = []
        slot = self._slots[0]
        try:
            for job in jobs:
                results.append(self._refit_one(slot, job))
        finally:
            if not self.persistent:
                self.close()
        return results

    def _refit_one(self, slot: _WorkerSlot, job: RefitJob) -> RefitResult:
        trial = job.trial

        def failed(error: str) -> RefitResult:
            return RefitResult(trial.model_type, trial.trial_number, STATUS_FAIL, error=error)

        if trial.model_type != "nn":
            return failed(f"model type {trial.model_type!r}: nn_batch refits 'nn' trials only")
        try:
            fit_jobs(trial)
        except ProtocolError as exc:
            return failed(f"invalid trial: {exc}")
        try:
            worker = slot.ensure_started()
            worker.send(refit_request(job, self.settings))
            while True:
                reply = worker.next_reply(timeout=self.silence_timeout_s)
                event = reply.get("event")
                if event == "result":  # a fold trained again: the refit is alive
                    continue
                if event == "error":
                    return failed(f"the NN worker refused or broke the refit: {reply.get('code')}: {reply.get('message')}")
                if event == "refit_done":
                    result = RefitResult.from_json(reply["result"])
                    if reply.get("arrays"):
                        result = load_refit_arrays(result, reply["arrays"])
                    result.info.setdefault("device", worker.info.get("device"))
                    return result
        except WorkerCrashed as exc:
            slot.discard()
            return failed(str(exc))
        except (OSError, ValueError, KeyError) as exc:  # the arrays' file unreadable, a result not a RefitResult
            return failed(f"the NN worker's refit could not be read: {type(exc).__name__}: {exc}")

    @staticmethod
    def _fold_result(reply: dict, worker: WorkerProcess) -> FoldResult:
        info = {"epochs": reply.get("epochs"), "best_epoch": reply.get("best_epoch"), "device": worker.info.get("device"),
                **reply.get("info", {})}
        return FoldResult(reply["trial_number"], reply["fold_idx"], "nn", reply.get("score"), float(reply.get("seconds", 0.0)),
                          reply["status"], reply.get("error"), info)

    def close(self) -> None:
        """Stop every worker. A slot thread still serving an interrupted batch sees its worker die and,
        with ``_closing`` set, fails its fits instead of starting a new worker; we wait for it."""
        self._closing.set()
        try:
            if any(thread.is_alive() for thread in self._threads):
                # A batch was cut off (Ctrl-C, SIGTERM): nothing reads what its workers would still train,
                # and letting them finish (SHUTDOWN_WAIT_S) would outlast a container's stop grace period.
                for slot in self._slots:
                    slot.discard()
            shutdown_slots(self._slots)
            for thread in self._threads:
                thread.join(timeout=60)
            shutdown_slots(self._slots)  # anything a thread started before it saw _closing
        finally:
            self._threads = []
            self._closing.clear()  # with persistent_workers false, the next batch starts workers again
