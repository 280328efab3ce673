"""The tree worker process: pinned to one GPU or to CPU cores, it trains trials on request.

TreeTrialPool starts it as a fresh interpreter (never a fork of the parent), with
CUDA_VISIBLE_DEVICES already narrowed in its environment to its one GPU (or emptied for a CPU
worker), and with its config as JSON on the command line:

    python -m watcher_plugins.tree_parallel.worker --config '{"placement": {...}, "rounds": 500, ...}'

Protocol: one JSON object a line.
    parent -> worker  {"command": "ping"}
                      {"command": "train", "job": {TrialJob}, "folds": [0, 1, ...]}
                      {"command": "shutdown"}
    worker -> parent  {"event": "ready" | "pong", "pid": ..., "gpu": ..., "threads": ..., ...}
                      {"event": "fold", "result": {FoldResult}}     one per fold, as each finishes
                      {"event": "done", "trial_number": n}          after the trial's last fold
                      {"event": "error", "message": ...}            a request it could not read
A GPU trial is trained under the GPU's lease; a lease not had in time fails the trial's folds with
the holder's name. The worker never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TextIO

from watcher_plugins.errors import LeaseError
from watcher_plugins.lease import GpuLease
from watcher_plugins.records import STATUS_FAIL, FoldResult, TrialJob
from watcher_plugins.stdio import claim_stdout
from watcher_plugins.tree_parallel.libraries import FitSettings, runs_on_gpu
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.trial import FoldDataCache, run_trial

# Fault injection for the fault tests: a job param "_fault" is obeyed only when this variable is "1"
# in the worker's environment, and is always removed before the params reach a library.
FAULT_INJECTION_ENV = "WATCHER_TREE_FAULT_INJECTION"
FAULT_PARAM = "_fault"


class TreeWorker:
    """Serves protocol requests from ``inp`` and answers on ``out``."""

    def __init__(self, config: dict, out: TextIO):
        self.placement = WorkerPlacement.from_json(config["placement"])
        self.rounds = int(config["rounds"])
        self.early_stopping_rounds = int(config["early_stopping_rounds"])
        self.lease_dir = config.get("lease_dir")
        self.lease_timeout_s = float(config.get("lease_timeout_s", 600.0))
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
                command = request["command"]
            except (ValueError, KeyError, TypeError):
                self.send({"event": "error", "message": f"not a request: {line.strip()[:200]!r}"})
                continue
            if command == "shutdown":
                return
            if command == "ping":
                self.send(self.describe("pong"))
            elif command == "train":
                self.train(TrialJob.from_json(request["job"]), list(request["folds"]))
            else:
                self.send({"event": "error", "message": f"unknown command {command!r}"})

    def train(self, job: TrialJob, folds: list[int]) -> None:
        params = dict(job.params)
        fault = params.pop(FAULT_PARAM, None)
        job = TrialJob(job.model_type, job.trial_number, params, job.data, job.folds, job.seed)
        use_gpu = runs_on_gpu(job.model_type, self.placement.gpu is not None)
        settings = FitSettings(self.rounds, self.early_stopping_rounds, self.placement.threads, use_gpu)

        def report(result: FoldResult) -> None:
            result.info.update(pid=os.getpid(), worker_gpu=self.placement.gpu, slot=self.placement.slot)
            self.send({"event": "fold", "result": result.to_json()})

        if use_gpu:
            lease = GpuLease(self.placement.gpu, self.lease_dir, self.lease_timeout_s,
                             purpose=f"tree_parallel worker: {job.model_type} trial {job.trial_number}")
            started = time.perf_counter()
            try:
                lease.acquire()
            except LeaseError as exc:
                for fold_idx in folds:
                    report(FoldResult(job.trial_number, fold_idx, job.model_type, None,
                                      time.perf_counter() - started, STATUS_FAIL, error=str(exc)))
                self.send({"event": "done", "trial_number": job.trial_number})
                return
            try:
                _inject(fault)
                run_trial(job, settings, self.cache, folds, on_fold=report)
            finally:
                lease.release()
        else:
            _inject(fault)
            run_trial(job, settings, self.cache, folds, on_fold=report)
        self.send({"event": "done", "trial_number": job.trial_number})


def _inject(fault: str | None) -> None:
    """Make the fault a test asked for: "abort" (dies as from a segfault), "abort_once:PATH" (dies
    unless PATH exists, creating it first), "sleep:SECONDS" (a long trial, to be killed mid-way)."""
    if not fault or os.environ.get(FAULT_INJECTION_ENV) != "1":
        return
    kind, _, arg = str(fault).partition(":")
    if kind == "abort":
        os.abort()
    elif kind == "abort_once" and not os.path.exists(arg):
        open(arg, "w").close()
        os.abort()
    elif kind == "sleep":
        time.sleep(float(arg))


def _pin(placement: WorkerPlacement) -> None:
    if hasattr(os, "sched_setaffinity") and placement.cores:
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
    worker.serve(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
