"""How far apart fp32 fits land when only the rounding differs (a measurement, not a test).

Trains tests/nn_cases.py's mixed batch (embedded survivors, 3 folds, TF32 off) at the given size in
several ways, and prints each fit's R^2 and best epoch against the plain reference's (nn_cases.plain_fit:
nn.Sequential + torch.optim.Adam):
- plain_rows_permuted_<seed> (--permutations): the plain reference again with each fit's training rows
  in a random order, so every loss and gradient is the same sum added in another order;
- plain_cublaslt (GPU only): the plain reference with cuBLASLt preferred, so only the GEMM kernels change;
- serial (a pack of one: the package's one computation of a fit), fused (8 fits at once: the same bits
  as serial), streams, and on a GPU fused_eager (no CUDA graphs).
The plain_* columns are the floor: no computation can be expected to agree with the plain reference
more closely than it agrees with itself once its rounding changes. Writes
agreement_<device>_<rows>x<epochs>.json.

    PYTHONPATH=. python bench/nn_gpu_agreement.py --out $OUT                          # the GPU test's batch
    PYTHONPATH=. python bench/nn_gpu_agreement.py --out $OUT --rows 4000 --max-epochs 80 --patience 10 \
      --permutations 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nn_cases import DATA, MIXED, SETTINGS, fit_tasks, outcomes, plain_fit  # noqa: E402

from watcher_plugins.nn_batch.device_data import DeviceDatasetCache  # noqa: E402
from watcher_plugins.nn_batch.fused import FusedTrainer  # noqa: E402
from watcher_plugins.nn_batch.serial import SerialTrainer  # noqa: E402
from watcher_plugins.nn_batch.streams import StreamsTrainer  # noqa: E402
from watcher_plugins.nn_batch.training import TrainSettings, precision_context  # noqa: E402
from watcher_plugins.records import DataRef  # noqa: E402


@contextlib.contextmanager
def preferred_blas_library(name: str):
    """cuBLAS or cuBLASLt for torch's CUDA matmuls inside the block."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=DATA.rows)
    parser.add_argument("--max-epochs", type=int, default=SETTINGS.max_epochs)
    parser.add_argument("--patience", type=int, default=SETTINGS.patience)
    parser.add_argument("--permutations", type=int, default=2,
                        help="the plain reference again with each fit's training rows in this many random orders")
    parser.add_argument("--commit", default=None,
                        help="the code's commit, for the record (default: this checkout's HEAD)")
    args = parser.parse_args()
    device = torch.device(args.device)
    ref = DataRef(embedded="survivors", rows=args.rows)
    settings = TrainSettings(max_epochs=args.max_epochs, patience=args.patience)
    cache = DeviceDatasetCache(device)

    def run(trainer, k: int) -> dict:
        with precision_context("fp32", device):
            return outcomes(trainer, fit_tasks(cache, ref), k)

    def plain(seed: int | None = None) -> dict:
        with precision_context("fp32", device):
            return {task.key: dict(zip(("r2", "best_epoch"), plain_fit(task, settings, seed)))
                    for task in fit_tasks(cache, ref)}

    arms = {"plain": plain()}
    for seed in range(args.permutations):
        arms[f"plain_rows_permuted_{seed}"] = plain(seed)
    if device.type == "cuda":
        with preferred_blas_library("cublaslt"):
            arms["plain_cublaslt"] = plain()
    trained = {"serial": run(SerialTrainer(settings, device), 1), "fused": run(FusedTrainer(settings, device), 8),
               "streams": run(StreamsTrainer(settings, device), 8)}
    if device.type == "cuda":
        trained["fused_eager"] = run(FusedTrainer(settings, device, cuda_graphs=False), 8)
    for name, got in trained.items():
        arms[name] = {key: {"r2": o.score, "best_epoch": o.best_epoch} for key, o in got.items()}

    rows, worst = [], {name: 0.0 for name in arms if name != "plain"}
    for spec in MIXED:
        key = (spec[0], spec[1])
        row = {"fit": list(key), "hidden": spec[2], "lr": spec[3], "dropout": spec[5]}
        for name, got in arms.items():
            row[name] = dict(got[key])
            if name != "plain":
                diff = abs(got[key]["r2"] - arms["plain"][key]["r2"])
                row[name]["abs_diff_vs_plain"] = diff
                worst[name] = max(worst[name], diff)
        rows.append(row)
        print(key, spec[2], f"p={spec[5]:.2f}", "  ".join(
            f"{name}: {row[name]['r2']:.7f}@{row[name]['best_epoch']}" for name in arms))
    print(f"{args.device} {args.rows} rows, <= {args.max_epochs} epochs, patience {args.patience}; "
          f"max |R2 - plain|: {json.dumps(worst)}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = args.out / f"agreement_{device.type}_{args.rows}x{args.max_epochs}.json"
    path.write_text(json.dumps({
        "device": name, "torch": torch.__version__, "commit": args.commit or git_commit(), "argv": sys.argv[1:],
        "rows": args.rows, "max_epochs": args.max_epochs, "patience": args.patience, "fits": rows,
        "max_abs_diff_vs_plain": worst}, indent=1))


if __name__ == "__main__":
    main()
