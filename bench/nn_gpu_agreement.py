"""How far apart fp32 fits land on a GPU when only the rounding differs (a measurement, not a test).

Runs tests/gpu/test_nn_gpu.py's mixed batch (embedded survivors, 4,000 rows, 3 folds, at most 80
epochs, patience 10; TF32 off) four ways: serial with the default BLAS library, serial again with
cuBLASLt preferred (the same fits, only the GEMM kernels change), fused, and streams; prints each
fit's R^2 and best epoch and writes gpu_agreement.json. The serial-vs-serial column is the floor:
no trainer can be expected to agree with serial more closely than serial agrees with itself once
its matrix kernels change.

    PYTHONPATH=. python bench/nn_gpu_agreement.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.nn_batch.serial import SerialTrainer
from watcher_plugins.nn_batch.streams import StreamsTrainer
from watcher_plugins.nn_batch.training import FitTask, TrainSettings, precision_context
from watcher_plugins.records import DataRef

DATA = DataRef(embedded="survivors", rows=4000)
SETTINGS = TrainSettings(max_epochs=80, patience=10)
MIXED = [  # tests/gpu/test_nn_gpu.py's batch: (trial, fold, hidden, lr, weight decay, dropout)
    (0, 0, [256, 128, 64], 3e-3, 1e-4, 0.0), (0, 1, [256, 128, 64], 3e-3, 1e-4, 0.0),
    (1, 2, [128, 64, 32], 1e-2, 0.0, 0.2), (2, 0, [512, 256, 128], 1e-3, 1e-5, 0.1),
    (3, 1, [128, 64], 5e-3, 0.0, 0.0), (4, 2, [256, 128], 2e-2, 1e-3, 0.15),
    (5, 0, [64, 32, 16, 8], 1e-2, 0.0, 0.0), (6, 1, [256, 128, 64, 32], 2e-3, 1e-6, 0.25),
]


def run(trainer, data, k: int) -> dict:
    tasks = [FitTask.build(FitJob(t, f, 3, 11, tuple(h), lr, wd, p, DATA), data) for t, f, h, lr, wd, p in MIXED]
    got = {}
    with precision_context("fp32", trainer.device):
        trainer.train(tasks, k, lambda o: got.__setitem__(o.key, o))
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda:0")
    data = DeviceDatasetCache(device).get(DATA)
    arms = {"serial": run(SerialTrainer(SETTINGS, device), data, 1)}
    default_blas = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    arms["serial_cublaslt"] = run(SerialTrainer(SETTINGS, device), data, 1)
    torch.backends.cuda.preferred_blas_library(default_blas)
    arms["fused"] = run(FusedTrainer(SETTINGS, device), data, 8)
    arms["streams"] = run(StreamsTrainer(SETTINGS, device), data, 8)
    rows, worst = [], {name: 0.0 for name in arms if name != "serial"}
    for spec in MIXED:
        key = (spec[0], spec[1])
        row = {"fit": list(key), "hidden": spec[2], "lr": spec[3], "dropout": spec[5]}
        for name, got in arms.items():
            row[name] = {"r2": got[key].r2, "best_epoch": got[key].best_epoch}
            if name != "serial":
                diff = abs(got[key].r2 - arms["serial"][key].r2)
                row[name]["abs_diff_vs_serial"] = diff
                worst[name] = max(worst[name], diff)
        rows.append(row)
        print(key, spec[2], f"p={spec[5]:.2f}", "  ".join(
            f"{name}: {row[name]['r2']:.7f}@{row[name]['best_epoch']}" for name in arms))
    print("max |R2 - serial|:", json.dumps(worst))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_agreement.json").write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "default_blas": str(default_blas), "fits": rows, "max_abs_diff_vs_serial": worst}, indent=1))


if __name__ == "__main__":
    main()
