"""What one GPU tree fit costs: the fixed part (a 1-round fit) against the per-round part.

On the GPU the tree pool's wall time is the GPU trials' summed time (CatBoost must own its GPU), so a
fixed cost per fit -- device setup, memory pools -- bounds every schedule. This times fold 0 of
survivors-98k with one trial's params at 1 round and at ``--rounds`` rounds (early stopping off), for
CatBoost with its default GPU memory pool and for each ``--catboost-ram-part`` given, and for XGBoost;
each fit is repeated ``--repeats`` times (the median is reported) and its R^2 printed, so a setting
that changed the model would show.

    CUDA_VISIBLE_DEVICES=0 python bench/tree_fit_cost.py --rounds 200 --catboost-ram-part 0.05 --out cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from watcher_plugins.data import FULL_ROWS, embedded_survivors, kfold_splits  # noqa: E402
from watcher_plugins.tree_parallel.libraries import FitSettings, fitter_for  # noqa: E402
from watcher_plugins.tree_parallel.trial import sample_params  # noqa: E402


def time_fits(model_type: str, params: dict, rounds: int, repeats: int, threads: int, data) -> dict:
    settings = FitSettings(rounds=rounds, early_stopping_rounds=rounds, threads=threads, use_gpu=True)
    X, y, (train, val) = data
    fitter = fitter_for(model_type)
    fold = fitter.prepare_fold(X[train], y[train], X[val], y[val], settings)
    seconds, r2 = [], set()
    for _ in range(repeats):
        started = time.perf_counter()
        fit = fitter.fit(fold, dict(params), seed=7, settings=settings)
        seconds.append(time.perf_counter() - started)
        r2.add(fit.score)
    return {"model": model_type, "params": params, "rounds": rounds, "median_s": statistics.median(seconds),
            "seconds": seconds, "r2": sorted(r2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trial", type=int, default=0, help="which sampled trial's params to use")
    p.add_argument("--catboost-ram-part", type=float, action="append", default=[],
                   help="also time CatBoost with this gpu_ram_part (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    ds = embedded_survivors(FULL_ROWS)
    data = (ds.X, ds.y, kfold_splits(ds.n_rows, 5, 42)[0])
    variants = [("catboost", {})] + [("catboost", {"gpu_ram_part": part}) for part in args.catboost_ram_part]
    variants.append(("xgboost", {}))
    rows = []
    for model_type, extra in variants:
        params = {**sample_params(model_type, args.trial, 42), **extra}
        for rounds in (1, args.rounds):
            row = time_fits(model_type, params, rounds, args.repeats, args.threads, data)
            rows.append(row)
            print(f"{model_type:<9} {json.dumps(extra):<24} rounds {rounds:>4}: median {row['median_s']:.3f} s "
                  f"(runs {', '.join(f'{s:.3f}' for s in row['seconds'])}), R2 {row['r2']}", flush=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
