"""Step 5 on the survivors data under two package trees: are their trials.jsonl the same apart from
timings? (A measurement for the device machine: a refactor's "behaviour unchanged" on the GPU.)

Each --tree (a directory holding a ``watcher_plugins`` package, such as ``git archive <commit>``
unpacked, or ``.`` for this checkout) runs compare_models in a process of its own, with that tree first
on PYTHONPATH, every model type given by --model-types, on --devices. Lines are compared after taking
out each line's "seconds" and sorting them (they are written as folds finish). Writes comparison.json
under --out: the command, the GPU, each tree's seconds and verdict, the first tree's lines.

    PYTHONPATH=.:/tmp/site python bench/before_after_identical.py --tree .legacy/before --tree . --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.nn_e2e_identical import timings_out

# Run inside each tree's process: imports resolve to that tree's package.
_RUN = """
import json, sys
import watcher_plugins
from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.manager import get_plugin_manager
from watcher_plugins.manifest import load_manifest
print("package:", watcher_plugins.__file__, flush=True)
pm = get_plugin_manager()
run_compare_models(load_manifest(None, sys.argv[1], pm).params, pm)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="a directory holding watcher_plugins/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", default="0", help='GPU indices, or "cpu"')
    parser.add_argument("--model-types", default="nn,catboost,lightgbm,xgboost")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--tree-rounds", type=int, default=100)
    args = parser.parse_args()
    devices = "cpu" if args.devices == "cpu" else [int(d) for d in args.devices.split(",")]
    runs = []
    for i, tree in enumerate(args.tree):
        out_dir = args.out / f"run{i}"
        params = {"model_types": args.model_types.split(","), "trials": args.trials, "ask_batch_size": 4,
                  "folds": args.folds, "devices": devices, "data": {"embedded": "survivors", "rows": args.rows},
                  "progress": False, "output_dir": str(out_dir), "nn_max_epochs": args.max_epochs,
                  "nn_patience": 10, "tree_rounds": args.tree_rounds}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tree).resolve()), os.environ.get("PYTHONPATH", "")]))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(params)], env=env, capture_output=True, text=True)
        seconds = round(time.perf_counter() - started, 2)
        print(f"{tree}: exit {proc.returncode}, {seconds} s; {proc.stdout.strip()}", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append({"tree": tree, "seconds": seconds, "lines": timings_out(out_dir / "trials.jsonl")})
    reference = runs[0]
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and devices != "cpu" else "cpu"
    except ImportError:
        gpu = "cpu"
    result = {"command": " ".join(["python", *sys.argv]), "gpu": gpu, "params": vars(args) | {"out": str(args.out)},
              "runs": [{"tree": r["tree"], "seconds": r["seconds"], "fold_lines": len(r["lines"]),
                        "identical_to_first_apart_from_seconds": r["lines"] == reference["lines"]} for r in runs],
              "first_run_lines": reference["lines"]}
    for run in result["runs"]:
        print(f"{run['tree']}: identical to {reference['tree']} apart from timings: "
              f"{run['identical_to_first_apart_from_seconds']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(result, indent=1))
    return 0 if all(r["identical_to_first_apart_from_seconds"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
