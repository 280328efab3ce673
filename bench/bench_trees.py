"""Tree trials serial vs parallel on the survivors-98k workload, in one run, as a ratio.

Each arm trains the same batch (``--trials`` trials each of CatBoost, LightGBM and XGBoost, params
drawn by a seeded sampler, ``--folds``-fold CV, at most ``--rounds`` boosting rounds with early
stopping) through TreeParallelExecutor, as compare_models sends it: one mixed batch. An arm is
NAME:GPUS:CORES:WORKERS[:XGBOOST_PER_GPU[:FOLD_THREADS[:GPU_WORKER_CORES]]], e.g. ``serial:0:16:1``
(GPU 0, 16 cores, tree_parallel_workers 1), ``auto:0,1:32:auto`` (tree_parallel_workers auto), ``xgb4:0:16:8:4`` (8 workers, 4 of them on GPU 0, where up
to 4 XGBoost trials run at once; xgboost_per_gpu defaults to 1) or ``folds1:0:16:8:1:1:2`` (8 workers,
XGBoost's folds one at a time on a 2-core GPU worker; the executor params xgboost_gpu_fold_threads and
tree_gpu_worker_cores default to auto). Worker start-up is outside the timed region;
dataset building inside a worker is inside it.

    python bench/bench_trees.py --trials 8 --rounds 200 \\
        --arm serial:0:16:1 --arm parallel-1gpu:0:16:8 --arm parallel-1gpu-xgb4:0:16:8:4 --out results.json

Writes the JSON after every arm (so a cut-off run keeps what it measured) and prints a table last.

A serial arm longer than one device call can be split by model type (``--models``), one call each,
and the parallel run then takes those reports as its baseline: ``--baseline a.json --baseline b.json``
joins their first arms into one (seconds summed: a serial batch trains its trials one after another)
and ratios and R^2 differences are reported against it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from watcher_plugins.data import FULL_ROWS, embedded_survivors  # noqa: E402
from watcher_plugins.executor import RunContext  # noqa: E402
from watcher_plugins.records import DataRef, TrialJob  # noqa: E402
from watcher_plugins.tree_parallel.executor import TreeParallelExecutor  # noqa: E402
from watcher_plugins.tree_parallel.trial import sample_params  # noqa: E402

MODEL_TYPES = ("catboost", "lightgbm", "xgboost")


def parse_arm(text: str) -> dict:
    try:
        name, gpus, cores, workers, *rest = text.split(":")
        if len(rest) > 3:
            raise ValueError
        arm = {"name": name, "gpus": [int(g) for g in gpus.split(",") if g != ""], "cores": int(cores),
               "workers": _count_or_auto(workers), "xgboost_per_gpu": int(rest[0]) if rest else 1,
               "xgboost_gpu_fold_threads": _count_or_auto(rest[1] if len(rest) > 1 else "auto"),
               "tree_gpu_worker_cores": _count_or_auto(rest[2] if len(rest) > 2 else "auto")}
        if arm["xgboost_per_gpu"] < 1:
            raise ValueError
        return arm
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--arm {text!r}: expected NAME:GPUS:CORES:WORKERS[:XGBOOST_PER_GPU[:FOLD_THREADS[:GPU_WORKER_CORES]]], "
            "an integer >= 1 for XGBOOST_PER_GPU, 'auto' or an integer >= 1 for the others") from None


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def versions() -> dict:
    out = {}
    for dist in ("catboost", "lightgbm", "xgboost", "optuna", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_arm(arm: dict, jobs: list[TrialJob], args, workdir: Path) -> dict:
    params = {"tree_parallel_workers": arm["workers"], "xgboost_per_gpu": arm["xgboost_per_gpu"],
              "xgboost_gpu_fold_threads": arm["xgboost_gpu_fold_threads"],
              "tree_gpu_worker_cores": arm["tree_gpu_worker_cores"],
              "tree_device": "gpu" if arm["gpus"] else "cpu",
              "tree_rounds": args.rounds, "tree_early_stopping_rounds": args.early_stopping_rounds,
              "catboost_gpu_ram_part": args.catboost_gpu_ram_part,
              "xgboost_gpu_async_pool": args.xgboost_gpu_async_pool, "folds": args.folds}
    context = RunContext(output_dir=workdir, devices=arm["gpus"], cpu_count=arm["cores"], trial_retries=0,
                         data_shape=(args.rows, 62))
    with TreeParallelExecutor(params, context) as ex:
        ex.pool.start()
        started = time.perf_counter()
        results = ex.run_batch(jobs)
        seconds = time.perf_counter() - started
        placements = [p.describe() for p in ex.placements]
        fold_threads = ex.settings.xgboost_gpu_fold_threads
    by_trial: dict[str, list] = {}
    per_model_seconds: dict[str, float] = {}
    failures = []
    for r in results:
        by_trial.setdefault(f"{r.model_type}/{r.trial_number}", []).append(r.score)
        per_model_seconds[r.model_type] = per_model_seconds.get(r.model_type, 0.0) + r.seconds
        if r.status != "ok":
            failures.append(f"{r.model_type} trial {r.trial_number} fold {r.fold_idx}: {r.error}")
    mean_r2 = {k: (sum(v) / len(v) if all(x is not None for x in v) else None) for k, v in by_trial.items()}
    return {**arm, "seconds": seconds, "trials": len(jobs), "trials_per_min": len(jobs) / seconds * 60,
            "placements": placements, "xgboost_gpu_fold_threads_used": fold_threads,
            # Whether GPU XGBoost allocated from CUDA's stream-ordered pool (each GPU fold reports it).
            "xgboost_async_pool_used": sorted({r.info["xgboost_async_pool"] for r in results
                                               if "xgboost_async_pool" in r.info}),
            "fold_seconds_by_model": per_model_seconds, "failures": failures[:20],
            "n_failed_folds": len(failures), "mean_r2": mean_r2}


ARM_SETTINGS = ("gpus", "cores", "workers", "xgboost_per_gpu", "xgboost_gpu_fold_threads", "tree_gpu_worker_cores")


def joined_baseline(paths: list[Path], report: dict) -> dict:
    """The first arms of earlier reports of this workload (other model types), joined into one arm.

    Refused unless every part ran the same workload (the model types aside, tree params included) on
    the same GPU model with the same versions of its libraries, with the same arm settings, and lost
    no fold."""
    workload = report["workload"]
    ours = {k: v for k, v in workload.items() if k != "models"}
    arms = []
    for path in paths:
        part = json.loads(path.read_text())
        if "models" not in part.get("workload", {}):
            raise SystemExit(f"--baseline {path}: no workload.models (a report from before --models)")
        theirs = {k: v for k, v in part["workload"].items() if k != "models"}
        if theirs != ours:
            raise SystemExit(f"--baseline {path}: workload {theirs} is not this run's {ours}")
        if part["gpus"] != report["gpus"]:
            raise SystemExit(f"--baseline {path}: GPUs {part['gpus']}, this run {report['gpus']}")
        for lib in part["workload"]["models"]:
            if part["versions"].get(lib) != report["versions"].get(lib):
                raise SystemExit(f"--baseline {path}: {lib} {part['versions'].get(lib)}, this run "
                                 f"{report['versions'].get(lib)}")
        arm = part["arms"][0]
        if arm["n_failed_folds"]:
            raise SystemExit(f"--baseline {path}: its arm {arm['name']!r} lost {arm['n_failed_folds']} folds")
        if arms and any(arm.get(k) != arms[0].get(k) for k in ARM_SETTINGS):
            raise SystemExit(f"--baseline {path}: arm settings {[arm.get(k) for k in ARM_SETTINGS]} differ from "
                             f"{paths[0]}'s {[arms[0].get(k) for k in ARM_SETTINGS]} ({', '.join(ARM_SETTINGS)})")
        arms.append({**arm, "models": part["workload"]["models"]})
    models = [m for arm in arms for m in arm["models"]]
    if sorted(models) != sorted(workload["models"]):
        raise SystemExit(f"--baseline: the reports cover model types {models}, this run {workload['models']}")
    seconds, trials = sum(a["seconds"] for a in arms), sum(a["trials"] for a in arms)
    return {
        "name": "+".join(f"{a['name']}({','.join(a['models'])})" for a in arms), "joined_from": [str(p) for p in paths],
        **{k: arms[0].get(k) for k in ARM_SETTINGS},
        "seconds": seconds, "trials": trials, "trials_per_min": trials / seconds * 60,
        "fold_seconds_by_model": {k: v for a in arms for k, v in a["fold_seconds_by_model"].items()},
        "n_failed_folds": sum(a["n_failed_folds"] for a in arms),
        "mean_r2": {k: v for a in arms for k, v in a["mean_r2"].items()},
        "speedup_vs_first_arm": 1.0, "max_abs_mean_r2_diff_vs_first_arm": {},
    }


def compare(reference: dict, other: dict) -> dict:
    """Max |mean R^2 difference| per model type between two arms (0.0 = bit-identical results)."""
    out = {}
    for key, r2 in reference["mean_r2"].items():
        model = key.split("/")[0]
        b = other["mean_r2"].get(key)
        if r2 is None or b is None:
            continue
        out[model] = max(out.get(model, 0.0), abs(r2 - b))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="trials per model type")
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--early-stopping-rounds", type=int, default=50)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--rows", type=int, default=FULL_ROWS)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--models", default=",".join(MODEL_TYPES), help="model types, comma-separated")
    p.add_argument("--catboost-gpu-ram-part", type=lambda t: t if t == "auto" else float(t), default="auto",
                   help="the executor param of that name, for every arm (default auto)")
    p.add_argument("--xgboost-gpu-async-pool", action=argparse.BooleanOptionalAction, default=True,
                   help="the executor param of that name, in every arm (default: on)")
    p.add_argument("--arm", type=parse_arm, action="append", required=True)
    p.add_argument("--baseline", type=Path, action="append", default=[],
                   help="an earlier report whose first arm is (part of) the baseline; repeatable")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODEL_TYPES):
        p.error(f"--models {args.models!r}: expected a comma-separated subset of {','.join(MODEL_TYPES)}")

    embedded_survivors(args.rows)  # generate and cache the data outside every timed region
    data = DataRef(embedded="survivors", rows=args.rows)
    # Interleaved as compare_models sends them: one mixed batch, trial by trial.
    jobs = [TrialJob(m, t, sample_params(m, t, args.seed), data, args.folds, args.seed)
            for t in range(args.trials) for m in models]
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "workload": {"name": f"survivors-{args.rows}", "rows": args.rows, "features": 62, "folds": args.folds,
                     "trials_per_model": args.trials, "rounds_cap": args.rounds,
                     "early_stopping_rounds": args.early_stopping_rounds, "seed": args.seed, "models": models,
                     "catboost_gpu_ram_part": args.catboost_gpu_ram_part,
                     "xgboost_gpu_async_pool": args.xgboost_gpu_async_pool},
        "gpus": gpu_names(), "host_cpus": len(os.sched_getaffinity(0)), "versions": versions(),
        "python": sys.version.split()[0], "arms": [],
    }
    if args.baseline:
        report["arms"].append(joined_baseline(args.baseline, report))
    workdir = args.out.parent
    workdir.mkdir(parents=True, exist_ok=True)
    for arm in args.arm:
        print(f"arm {arm['name']}: GPUs {arm['gpus'] or 'none'}, {arm['cores']} cores, {arm['workers']} workers, "
              f"xgboost_per_gpu {arm['xgboost_per_gpu']}, xgboost_gpu_fold_threads "
              f"{arm['xgboost_gpu_fold_threads']}, tree_gpu_worker_cores {arm['tree_gpu_worker_cores']}", flush=True)
        result = run_arm(arm, jobs, args, workdir)
        report["arms"].append(result)
        base = report["arms"][0]
        result["speedup_vs_first_arm"] = base["seconds"] / result["seconds"]
        result["max_abs_mean_r2_diff_vs_first_arm"] = compare(base, result)
        print(f"  {result['seconds']:.1f} s, {result['trials_per_min']:.2f} trials/min, "
              f"{result['n_failed_folds']} failed folds; {'; '.join(result['placements'])}", flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    print()
    print(f"{'arm':<20} {'GPUs':<6} {'cores':>5} {'workers':>7} {'xgb/GPU':>7} {'seconds':>8} {'trials/min':>10} "
          f"{'speedup':>8}  max |dR2| vs first")
    for a in report["arms"]:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in sorted(a["max_abs_mean_r2_diff_vs_first_arm"].items()))
        print(f"{a['name']:<20} {','.join(map(str, a['gpus'])) or '-':<6} {a['cores']:>5} {a['workers']:>7} "
              f"{a['xgboost_per_gpu']:>7} {a['seconds']:>8.1f} {a['trials_per_min']:>10.2f} "
              f"{a['speedup_vs_first_arm']:>7.2f}x  {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
