"""Does XGBoost gain from training several folds at once on one GPU, from threads of one process?

Processes sharing a GPU time-slice (bench/results/2026-11-28-trees-bench-runs2-3-h200x2/README.md: four XGBoost processes
did no more work than one). Threads of one process share one CUDA context, and XGBoost launches on
per-thread default streams, so their kernels may overlap. This fits the first ``--trials`` sampled
XGBoost trials on the five folds of survivors-98k, once fold after fold and once with each trial's
folds in ``--threads`` threads (each fold's datasets used by one thread at a time), and prints the wall
time of each arm and whether every fold's R^2 is bit-identical to the sequential arm's.

    CUDA_VISIBLE_DEVICES=0 python bench/xgboost_threads_probe.py --trials 6 --arm 1:2 --arm 5:6 --out probe.json

An arm's flags: ``nobarrier`` (see ``run_arm``); ``asyncpool``: each fit allocates through CUDA's
stream-ordered pool (XGBoost's global ``use_cuda_async_pool``, 3.2+) instead of cudaMalloc/cudaFree,
whose free waits for the whole device, so one thread's free stalls the others' kernels; ``keep``: the
pool keeps freed memory instead of handing it back at each synchronisation (the device's default pool
release threshold raised, for the rest of the process: put such arms last).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from watcher_plugins.data import FULL_ROWS, embedded_survivors, kfold_splits  # noqa: E402
from watcher_plugins.tree_parallel.libraries import FitSettings, fitter_for  # noqa: E402
from watcher_plugins.tree_parallel.trial import sample_params  # noqa: E402


def run_arm(folds, params_list, settings, threads: int, barrier: bool = True,
            async_pool: bool = False) -> tuple[float, list[list[float]]]:
    """Fit every trial on every fold in ``threads`` threads (1 = one after another). With ``barrier`` a
    trial's folds run at once and the next trial waits for its slowest fold (a worker trains one trial
    at a time); without it any thread takes the next (trial, fold), so two threads may use one fold's
    datasets at once."""
    fitter = fitter_for("xgboost")
    settings = dataclasses.replace(settings, xgboost_async_pool=async_pool)

    def fit(task):
        trial, fold = task
        result = fitter.fit(folds[fold], dict(params_list[trial]), seed=1000 + trial, settings=settings)
        if settings.use_gpu and result.info["xgboost_async_pool"] is not async_pool:
            raise RuntimeError(f"asked for the pool {async_pool}, XGBoost used it: {result.info}")
        return result.score

    tasks = [[(t, f) for f in range(len(folds))] for t in range(len(params_list))]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        if barrier:
            r2 = [list(pool.map(fit, trial_tasks)) for trial_tasks in tasks]
        else:
            flat = list(pool.map(fit, [task for trial_tasks in tasks for task in trial_tasks]))
            r2 = [flat[i:i + len(folds)] for i in range(0, len(flat), len(folds))]
    return time.perf_counter() - started, r2


ARM_FLAGS = ("nobarrier", "asyncpool", "keep")


def parse_arm(text: str) -> dict:
    threads, cores, *flags = text.split(":")
    unknown = set(flags) - set(ARM_FLAGS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arm flag(s) {sorted(unknown)} in {text!r}: expected {ARM_FLAGS}")
    return {"threads": int(threads), "cores": int(cores), "barrier": "nobarrier" not in flags,
            "async_pool": "asyncpool" in flags or "keep" in flags, "keep": "keep" in flags}


def keep_freed_memory_in_default_pool() -> None:
    """Raise the release threshold of GPU 0's default memory pool to the maximum (driver API, ctypes)."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    device, pool = ctypes.c_int(), ctypes.c_void_p()
    threshold = ctypes.c_uint64(2**64 - 1)
    for call in (lambda: cuda.cuInit(0), lambda: cuda.cuDeviceGet(ctypes.byref(device), 0),
                 lambda: cuda.cuDeviceGetDefaultMemPool(ctypes.byref(pool), device),
                 lambda: cuda.cuMemPoolSetAttribute(pool, 4, ctypes.byref(threshold))):  # 4: RELEASE_THRESHOLD
        status = call()
        if status != 0:
            raise RuntimeError(f"CUDA driver call failed with status {status}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--arm", type=parse_arm, action="append", required=True,
                   help="THREADS:CORES[:FLAG...], FLAG one of nobarrier, asyncpool, keep; repeatable; the "
                        "first arm is the reference (e.g. 1:2)")
    p.add_argument("--fit-threads", type=int, default=2, help="nthread of each fit")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (to try the script without a GPU)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    pooled = [a for a in args.arm if a["async_pool"]]
    if args.cpu and pooled:
        p.error("--cpu: the asyncpool and keep flags need a GPU")
    kept = [i for i, a in enumerate(args.arm) if a["keep"]]
    if kept and any(not a["keep"] for a in args.arm[kept[0]:]):
        p.error("--arm: a keep arm changes the pool for the rest of the process; put the keep arms last")

    ds = embedded_survivors(FULL_ROWS)
    all_cores = sorted(os.sched_getaffinity(0))
    settings = FitSettings(rounds=args.rounds, early_stopping_rounds=50, threads=args.fit_threads,
                           use_gpu=not args.cpu)
    fitter = fitter_for("xgboost")
    folds = [fitter.prepare_fold(ds.X[tr], ds.y[tr], ds.X[va], ds.y[va], settings)
             for tr, va in kfold_splits(ds.n_rows, 5, 42)]
    params_list = [sample_params("xgboost", t, 42) for t in range(args.trials)]
    run_arm(folds, params_list[:1], settings, 1, async_pool=args.arm[0]["async_pool"])  # warm-up: CUDA context,
    # device copies of the matrices
    rows, reference = [], None
    for arm in args.arm:
        os.sched_setaffinity(0, all_cores[:arm["cores"]])
        if arm["keep"]:
            keep_freed_memory_in_default_pool()
        seconds, r2 = run_arm(folds, params_list, settings, arm["threads"], arm["barrier"], arm["async_pool"])
        reference = reference or {"seconds": seconds, "r2": r2}
        row = {**arm, "seconds": seconds, "ratio_vs_first": reference["seconds"] / seconds,
               "r2_bit_identical_to_first": r2 == reference["r2"], "r2": r2}
        rows.append(row)
        flags = ("" if arm["barrier"] else ", no barrier") + (", async pool" if arm["async_pool"] else "") \
            + (" kept" if arm["keep"] else "")
        print(f"{arm['threads']:>2} threads on {arm['cores']:>2} cores{flags}: "
              f"{seconds:6.2f} s = {row['ratio_vs_first']:.2f}x the first arm, R2 bit-identical: "
              f"{row['r2_bit_identical_to_first']}", flush=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
