"""Host memory of one tree worker, by data size and fold count: the figures behind
``placement.worker_memory_bytes`` (what ``tree_parallel_workers: auto`` plans with).

One CPU worker of a real TreeTrialPool trains two trials of each library in turn (LightGBM first, as a
CPU worker of a pool with GPUs trains only LightGBM) on synthetic data of each size; its peak resident
memory (VmHWM) is read after each library. A straight line through the sizes gives the bytes per cell
(row x feature) and the base (interpreter, libraries) for each fold count.

    python3 bench/probe_tree_worker_memory.py --rows 98784,400000 --folds 5,10 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from watcher_plugins.records import DataRef, TrialJob
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.pool import PoolSettings, TreeTrialPool
from watcher_plugins.tree_parallel.trial import sample_params

FEATURES = 62


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def measure(path: Path, folds: int, models: list[str], rounds: int) -> dict[str, int]:
    """Peak RSS of one worker after each library's trials (cumulative: it keeps every cache)."""
    pool = TreeTrialPool([WorkerPlacement(0, None, (0,))], PoolSettings(rounds=rounds, early_stopping_rounds=10))
    try:
        pool.start()
        pid = pool.worker_pids()[0]
        peaks = {}
        for model in models:
            jobs = [TrialJob(model, t, sample_params(model, t, 0), DataRef(path=str(path)), folds, 0) for t in range(2)]
            failed = [r for r in pool.run(jobs) if r.status != "ok"]
            if failed:
                raise SystemExit(f"{model}: {failed[0].error}")
            peaks[model] = peak_rss_bytes(pid)
        return peaks
    finally:
        pool.close()


def fit_line(cells: list[int], peaks: list[int]) -> dict[str, float]:
    slope, base = np.polyfit(cells, peaks, 1)
    return {"bytes_per_cell": float(slope), "base_bytes": float(base)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="98784,400000")
    p.add_argument("--folds", default="5,10")
    p.add_argument("--models", default="lightgbm,xgboost,catboost")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows, fold_counts, models = ([int(x) for x in args.rows.split(",")], [int(x) for x in args.folds.split(",")],
                                 args.models.split(","))
    rng = np.random.default_rng(0)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in rows:
            X = rng.normal(size=(n, FEATURES)).astype(np.float32)
            y = (X[:, :5].sum(axis=1) + rng.normal(size=n)).astype(np.float32)
            path = Path(tmp) / f"synthetic_{n}.npz"
            np.savez(path, X=X, y=y)
            for folds in fold_counts:
                started = time.monotonic()
                peaks = measure(path, folds, models, args.rounds)
                runs.append({"rows": n, "features": FEATURES, "folds": folds, "peak_rss_bytes": peaks,
                             "seconds": round(time.monotonic() - started, 1)})
                print(f"{n:>8} rows x {FEATURES}, {folds:>2} folds: " + ", ".join(
                    f"after {m} {b / 1e6:,.0f} MB" for m, b in peaks.items()), flush=True)
    fits = {}
    for folds in fold_counts:
        mine = [r for r in runs if r["folds"] == folds]
        cells = [r["rows"] * r["features"] for r in mine]
        fits[str(folds)] = {"lightgbm_only": fit_line(cells, [r["peak_rss_bytes"][models[0]] for r in mine]),
                            "all_libraries": fit_line(cells, [r["peak_rss_bytes"][models[-1]] for r in mine])}
    for folds, fit in fits.items():
        for what, line in fit.items():
            print(f"{folds:>2} folds, {what}: {line['base_bytes'] / 1e6:,.0f} MB + {line['bytes_per_cell']:.1f} B/cell")
    Path(args.out).write_text(json.dumps({
        "command": " ".join(sys.argv), "host": platform.node(), "python": platform.python_version(),
        "models_in_order": models, "rounds": args.rounds, "runs": runs, "fits_by_folds": fits}, indent=2))


if __name__ == "__main__":
    main()
