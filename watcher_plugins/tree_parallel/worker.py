"""The tree worker process: pinned to one GPU or to CPU cores, it trains trials (and refits) on request.

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
                      {"command": "refit", "job": {RefitJob}, "catboost_gpu_ram_part": null | share}
                      {"command": "shutdown"}
    worker -> parent  {"event": "ready" | "pong", "pid": ..., "gpu": ..., "threads": ..., ...}
                      {"event": "fold", "result": {FoldResult}}     one per fold, as each finishes
                      {"event": "done", "trial_number": n, "retiring": bool}
                                                    after the trial's last fold; retiring: a fold failed
                                                    on the GPU, and the worker exits now
                      {"event": "refit", "result": {RefitResult}, "arrays": path | null, "retiring": bool}
                                                    the refit's outcome; its oof and predictions are in
                                                    the npz file ``arrays`` (trial.REFIT_ARRAYS in the
                                                    job's model_dir), for the pool to read and remove
                      {"event": "error", "code": ..., "message": ...}
                                                    a request it refused (not JSON, or not one the
                                                    schema allows: the message names the JSON path)
The worker takes no GPU lease itself: the pool holds its GPU's lease on its behalf and sends it a GPU
trial only while holding it (several workers of one pool may share a GPU; see leases.py). The worker
never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TextIO

from watcher_plugins import faults
from watcher_plugins.child_process import protocol_schema
from watcher_plugins.orphans import exit_with_parent
from watcher_plugins.records import STATUS_FAIL, STATUS_OK, FoldResult, RefitJob, TrialJob
from watcher_plugins.stdio import claim_stdout
from watcher_plugins.tree_parallel.libraries import (
    FOLD_THREADS_GPU_MODEL_TYPES,
    FitSettings,
    runs_on_gpu,
)
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.trial import FoldDataCache, run_refit, run_trial

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
        self.faults = faults.current()  # for tests only (faults.py); unset, none

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
            elif command in ("train", "refit"):
                if command == "train":
                    failed_on_gpu = self.train(TrialJob.from_json(request["job"]), list(request["folds"]),
                                               request.get("catboost_gpu_ram_part"))
                else:
                    failed_on_gpu = self.refit(RefitJob.from_json(request["job"]), request.get("catboost_gpu_ram_part"))
                if failed_on_gpu:
                    # A failed GPU fit can leave the process's CUDA state broken (CatBoost's CUDA manager
                    # stays set: "State == nullptr" on every later fit; a sticky CUDA error likewise).
                    # Exit after the trial; the pool starts a fresh worker for the next one.
                    return

    def train(self, job: TrialJob, folds: list[int], catboost_gpu_ram_part: float | None = None) -> bool:
        """Train the folds, reporting each; True if a fold failed on the GPU."""
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
        with self.faults.tree_trial(job.model_type, job.trial_number, gpu=self.placement.gpu, folds=folds,
                                    catboost_gpu_ram_part=settings.catboost_gpu_ram_part, send=self.send):
            results = run_trial(job, settings, self.cache, folds, on_fold=report, fold_threads=fold_threads)
        failed_on_gpu = use_gpu and any(r.status != STATUS_OK for r in results)
        self.send({"event": "done", "trial_number": job.trial_number, "retiring": failed_on_gpu})
        return failed_on_gpu

    def refit(self, job: RefitJob, catboost_gpu_ram_part: float | None = None) -> bool:
        """Refit the job's trial (trial.run_refit) and report it; True if it failed on the GPU."""
        trial = job.trial
        use_gpu = runs_on_gpu(trial.model_type, self.placement.gpu is not None)
        settings = FitSettings(self.rounds, self.early_stopping_rounds, self.placement.threads, use_gpu,
                               catboost_gpu_ram_part, self.xgboost_gpu_async_pool)
        fold_threads = (self.xgboost_gpu_fold_threads
                        if use_gpu and trial.model_type in FOLD_THREADS_GPU_MODEL_TYPES else 1)
        sys.stderr.write(f"{TASK_STDERR_MARKER} {trial.model_type} {trial.trial_number} (refit)\n")
        sys.stderr.flush()
        output = run_refit(job, settings, self.cache, fold_threads=fold_threads)
        arrays = None
        try:
            arrays = output.save_arrays(job.model_dir) if output.result.status == STATUS_OK else None
        except OSError as exc:
            output.result.status, output.result.error = STATUS_FAIL, f"cannot write the refit's predictions: {exc}"
        output.result.info.update(pid=os.getpid(), worker_gpu=self.placement.gpu, slot=self.placement.slot)
        failed_on_gpu = use_gpu and output.result.status != STATUS_OK
        self.send({"event": "refit", "result": output.result.to_json(), "arrays": arrays, "retiring": failed_on_gpu})
        return failed_on_gpu


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
