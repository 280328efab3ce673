"""The tree worker process: pinned to one GPU or to CPU cores, it trains trials on request.

TreeTrialPool starts it as a fresh interpreter (never a fork of the parent), with
CUDA_VISIBLE_DEVICES already narrowed in its environment to its one GPU (or emptied for a CPU
worker), and with its config as JSON on the command line:

    python -m watcher_plugins.tree_parallel.worker --config '{"placement": {...}, "rounds": 500, ...}'

(config: placement, rounds, early_stopping_rounds, xgboost_gpu_fold_threads, xgboost_gpu_async_pool.)

Protocol: one JSON object a line; schemas/tree_worker_protocol.schema.json is the contract, and each
side checks what it receives against it.
    parent -> worker  {"command": "ping"}
                      {"command": "train", "job": {TrialJob}, "folds": [0, 1, ...],
                       "catboost_gpu_ram_part": null (auto) | share}
                      {"command": "shutdown"}
    worker -> parent  {"event": "ready" | "pong", "pid": ..., "gpu": ..., "threads": ..., ...}
                      {"event": "fold", "result": {FoldResult}}     one per fold, as each finishes
                      {"event": "done", "trial_number": n, "retiring": bool}
                                                    after the trial's last fold; retiring: a fold failed
                                                    on the GPU, and the worker exits now
                      {"event": "error", "code": ..., "message": ...}
                                                    a request it refused (not JSON, or not one the
                                                    schema allows: the message names the JSON path)
The worker takes no GPU lease itself: the pool holds its GPU's lease on its behalf and sends it a GPU
trial only while holding it (several workers of one pool may share a GPU; see leases.py). The worker
never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from watcher_plugins.child_process import protocol_schema
from watcher_plugins.orphans import exit_with_parent
from watcher_plugins.records import STATUS_OK, FoldResult, TrialJob
from watcher_plugins.stdio import claim_stdout
from watcher_plugins.tree_parallel.libraries import (
    FOLD_THREADS_GPU_MODEL_TYPES,
    CatBoostFitter,
    FitSettings,
    runs_on_gpu,
)
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.trial import FoldDataCache, run_trial

# Fault injection for the fault tests: a job param "_fault" is obeyed only when this variable is "1"
# in the worker's environment, and is always removed before the params reach a library.
FAULT_INJECTION_ENV = "WATCHER_TREE_FAULT_INJECTION"
FAULT_PARAM = "_fault"
# Written to stderr as a trial begins, so the pool can tell this trial's stderr from earlier trials'.
TASK_STDERR_MARKER = "tree worker: trial begins:"
PROTOCOL_SCHEMA = "tree_worker_protocol.schema.json"
REQUESTS = protocol_schema(PROTOCOL_SCHEMA, "request")


class TreeWorker:
    """Serves protocol requests from ``inp`` and answers on ``out``."""

    def __init__(self, config: dict, out: TextIO):
        self.placement = WorkerPlacement.from_json(config["placement"])
        self.rounds = int(config["rounds"])
        self.early_stopping_rounds = int(config["early_stopping_rounds"])
        # Folds of a GPU XGBoost trial trained at once, in threads (FOLD_THREADS_GPU_MODEL_TYPES).
        self.xgboost_gpu_fold_threads = int(config.get("xgboost_gpu_fold_threads", 1))
        # GPU XGBoost allocates from CUDA's stream-ordered pool (libraries.XGBoostFitter).
        self.xgboost_gpu_async_pool = bool(config.get("xgboost_gpu_async_pool", True))
        self.out = out
        self.cache = FoldDataCache()

    def send(self, obj: dict) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def describe(self, event: str) -> dict:
        return {
            "event": event, "pid": os.getpid(), "gpu": self.placement.gpu, "threads": self.placement.threads,
            "cores": list(self.placement.cores),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            # What the isolation tests check: no torch here, and a fresh interpreter (a fork of a pytest
            # parent would carry pytest in its modules).
            "modules": sorted(m for m in ("torch", "pytest", "catboost", "lightgbm", "xgboost") if m in sys.modules),
        }

    def serve(self, inp: TextIO) -> None:
        self.send(self.describe("ready"))
        while True:
            line = inp.readline()
            if not line:
                return  # the parent is gone
            try:
                request = json.loads(line)
            except (ValueError, RecursionError):
                self.send({"event": "error", "code": "malformed_json",
                           "message": f"not a request: not JSON: {line.strip()[:200]!r}"})
                continue
            problem = REQUESTS.problem(request)
            if problem is not None:
                self.send({"event": "error", "code": "invalid_request",
                           "message": f"not a request the protocol allows: {problem}"})
                continue
            command = request["command"]
            if command == "shutdown":
                return
            if command == "ping":
                self.send(self.describe("pong"))
            elif command == "train":
                failed_on_gpu = self.train(TrialJob.from_json(request["job"]), list(request["folds"]),
                                           request.get("catboost_gpu_ram_part"))
                if failed_on_gpu:
                    # A failed GPU fit can leave the process's CUDA state broken (CatBoost's CUDA manager
                    # stays set: "State == nullptr" on every later fit; a sticky CUDA error likewise).
                    # Exit after the trial; the pool starts a fresh worker for the next one.
                    return

    def train(self, job: TrialJob, folds: list[int], catboost_gpu_ram_part: float | None = None) -> bool:
        """Train the folds, reporting each; True if a fold failed on the GPU."""
        params = dict(job.params)
        fault = params.pop(FAULT_PARAM, None)
        job = TrialJob(job.model_type, job.trial_number, params, job.data, job.folds, job.seed)
        use_gpu = runs_on_gpu(job.model_type, self.placement.gpu is not None)
        settings = FitSettings(self.rounds, self.early_stopping_rounds, self.placement.threads, use_gpu,
                               catboost_gpu_ram_part, self.xgboost_gpu_async_pool)
        fold_threads = (self.xgboost_gpu_fold_threads
                        if use_gpu and job.model_type in FOLD_THREADS_GPU_MODEL_TYPES else 1)

        def report(result: FoldResult) -> None:
            result.info.update(pid=os.getpid(), worker_gpu=self.placement.gpu, slot=self.placement.slot)
            self.send({"event": "fold", "result": result.to_json()})

        sys.stderr.write(f"{TASK_STDERR_MARKER} {job.model_type} {job.trial_number}\n")
        sys.stderr.flush()
        with _ledger(fault, self.placement.gpu, job):
            _inject(fault, settings, folds, self.send)
            results = run_trial(job, settings, self.cache, folds, on_fold=report, fold_threads=fold_threads)
        failed_on_gpu = use_gpu and any(r.status != STATUS_OK for r in results)
        self.send({"event": "done", "trial_number": job.trial_number, "retiring": failed_on_gpu})
        return failed_on_gpu


def _inject(fault: str | dict | None, settings: FitSettings, folds: list[int], send: Callable[[dict], None]
            ) -> None:
    """Make the fault a test asked for: "abort" (dies as from a segfault), "abort_once:PATH" (dies
    unless PATH exists, creating it first, atomically), "abort_once_per_fold:DIR" (the same, with a
    file in DIR for each set of folds sent: every fold crashes on its first try), "sleep:SECONDS" (a
    long trial, to be killed mid-way), "stderr:TEXT" (writes TEXT to stderr and trains on), "stderr_latin1:TEXT"
    (the same, encoded as Latin-1: bytes that are not UTF-8, as a library may write), "orphan_pipes:PATH" (dies, leaving a forked
    child that holds its pipes open until PATH exists),
    "catboost_gpu_oom" (dies as CatBoost does when a GPU fit outgrows its memory reserve, unless the
    reserve is CatBoost's default: a fold that needs it all), "bad_reply" (sends a fold reply the
    protocol's schema refuses, then trains on)."""
    if not isinstance(fault, str) or os.environ.get(FAULT_INJECTION_ENV) != "1":
        return
    kind, _, arg = str(fault).partition(":")
    if kind == "abort":
        os.abort()
    elif kind == "catboost_gpu_oom" and settings.catboost_gpu_ram_part != CatBoostFitter.DEFAULT_GPU_RAM_PART:
        # CatBoost's own last words in that case (an H200, catboost 1.2.10), then its abort.
        sys.stderr.write("catboost/cuda/cuda_lib/memory_pool/stack_like_memory_pool.h:303: Error: Out of memory. "
                         "Requested 0.0263671875 MB; Free 0.01274585724 MB\n"
                         " of type NCudaLib::TOutOfMemoryError\n")
        sys.stderr.flush()
        os.abort()
    elif kind in ("abort_once", "abort_once_per_fold"):
        marker = arg if kind == "abort_once" else os.path.join(arg, "folds-" + "-".join(map(str, folds)))
        try:  # created atomically: of the workers training this trial's folds at once, one aborts
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.abort()
    elif kind == "orphan_pipes":
        # Fork a child that keeps this worker's pipes open until the file ARG exists (at most 120 s), then
        # die: the pool gets no end of stream from this worker.
        if os.fork() == 0:
            deadline = time.monotonic() + 120
            while not os.path.exists(arg) and time.monotonic() < deadline:
                time.sleep(0.1)
            os._exit(0)
        os.abort()
    elif kind == "stderr":
        sys.stderr.write(arg + "\n")
        sys.stderr.flush()
    elif kind == "stderr_latin1":
        sys.stderr.flush()
        sys.stderr.buffer.write(arg.encode("latin-1") + b"\n")
        sys.stderr.buffer.flush()
    elif kind == "sleep":
        time.sleep(float(arg))
    elif kind == "bad_reply":
        send({"event": "fold", "result": {"trial_number": 0, "fold_idx": "first", "model_type": "lightgbm",
                                          "r2": None, "seconds": 0.0, "status": "fail", "error": "bad_reply"}})


@contextlib.contextmanager
def _ledger(fault: str | dict | None, gpu: int | None, job: TrialJob) -> Iterator[None]:
    """The fault ``{"ledger": PATH, "rendezvous": N, "gate": PATH, "hold_s": S}``, for the GPU-sharing
    tests: append this trial's "enter" and "leave" (with its worker's GPU) to the ledger file around
    the trial. Each line is one O_APPEND write, so the file's order is the order they happened in and
    overlaps show without a clock. After entering, wait until N trials of its model type have entered
    on its GPU and until the gate file exists (at most 60 s), then sleep S seconds."""
    if not isinstance(fault, dict) or os.environ.get(FAULT_INJECTION_ENV) != "1":
        yield
        return
    path = fault["ledger"]

    def append(event: str) -> None:
        line = json.dumps({"event": event, "gpu": gpu, "model_type": job.model_type,
                           "trial": job.trial_number, "pid": os.getpid()}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def entered() -> int:
        with open(path, encoding="utf-8") as f:
            entries = [json.loads(line) for line in f if line.endswith("\n")]
        return sum(1 for e in entries if e["event"] == "enter" and e["gpu"] == gpu
                   and e["model_type"] == job.model_type)

    append("enter")
    try:
        deadline = time.monotonic() + 60
        gate = fault.get("gate")
        while time.monotonic() < deadline and (entered() < int(fault.get("rendezvous", 0))
                                               or (gate and not os.path.exists(gate))):
            time.sleep(0.02)
        time.sleep(float(fault.get("hold_s", 0)))
        yield
    finally:
        append("leave")


def _pin(placement: WorkerPlacement) -> None:
    if hasattr(os, "sched_setaffinity") and placement.cores and placement.pinned:
        try:
            os.sched_setaffinity(0, placement.cores)
        except OSError:
            pass  # cores outside this container's set: the thread counts still bound the load
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashed worker is replaced; no core files
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m watcher_plugins.tree_parallel.worker")
    parser.add_argument("--config", required=True, help="the worker's config as JSON")
    config = json.loads(parser.parse_args(argv).config)
    out = claim_stdout()
    worker = TreeWorker(config, out)
    _pin(worker.placement)
    exit_with_parent()
    worker.serve(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
