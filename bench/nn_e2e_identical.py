"""Step 5 end to end, NN only, under several NN settings: are the trials.jsonl files the same apart from
timings? (A measurement for the device machine; tests/test_reproducible.py asserts it on the CPU.)

Runs compare_models on the embedded survivors data with each of --settings (n_concurrent_nn/nn_strategy
pairs), then compares each run's trials.jsonl with the first one's after taking out each line's
"seconds" and sorting the lines (they are written as folds finish, so their order is a timing too).
Writes comparison.json under --out, with the first run's lines (timings out) and each run's verdict.

    PYTHONPATH=. python bench/nn_e2e_identical.py --out $OUT --devices 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.manager import get_plugin_manager
from watcher_plugins.manifest import load_manifest

SETTINGS = ["1/auto", "auto/auto", "8/serial", "8/fused", "3/streams"]


def timings_out(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds")
        lines.append(json.dumps(record, sort_keys=True))
    return sorted(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", default="0", help='the manifest\'s "devices": GPU indices, or "cpu"')
    parser.add_argument("--settings", default=",".join(SETTINGS), help="n_concurrent_nn/nn_strategy pairs")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-epochs", type=int, default=100)
    args = parser.parse_args()
    devices = "cpu" if args.devices == "cpu" else [int(d) for d in args.devices.split(",")]
    pm = get_plugin_manager()
    runs = []
    for setting in args.settings.split(","):
        concurrency, strategy = setting.split("/")
        out_dir = args.out / f"run_{concurrency}_{strategy}"
        shutil.rmtree(out_dir, ignore_errors=True)
        params = {"model_types": ["nn"], "trials": args.trials, "ask_batch_size": 4, "folds": args.folds,
                  "devices": devices, "data": {"embedded": "survivors", "rows": args.rows}, "progress": False,
                  "output_dir": str(out_dir), "nn_max_epochs": args.max_epochs, "nn_patience": 10,
                  "precision": args.precision, "nn_strategy": strategy,
                  "n_concurrent_nn": concurrency if concurrency == "auto" else int(concurrency)}
        started = time.perf_counter()
        run_compare_models(load_manifest(None, json.dumps(params), pm).params, pm)
        runs.append({"setting": setting, "seconds": round(time.perf_counter() - started, 2),
                     "lines": timings_out(out_dir / "trials.jsonl"), "dir": out_dir})
        print(f"{setting}: {runs[-1]['seconds']} s, {len(runs[-1]['lines'])} fold lines", flush=True)
    reference = runs[0]
    result = {"command": " ".join(["python", *sys.argv]),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and devices != "cpu" else "cpu",
              "torch": torch.__version__, "params": vars(args) | {"out": str(args.out)}, "runs": []}
    for run in runs:
        same = run["lines"] == reference["lines"]
        result["runs"].append({"setting": run["setting"], "seconds": run["seconds"], "fold_lines": len(run["lines"]),
                               "identical_to_first_apart_from_seconds": same})
        print(f"{run['setting']}: identical to {reference['setting']} apart from timings: {same}")
    result["first_run_lines"] = reference["lines"]
    (args.out / "comparison.json").write_text(json.dumps(result, indent=1))
    return 0 if all(r["identical_to_first_apart_from_seconds"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
