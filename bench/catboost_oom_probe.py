"""What CatBoost does when a GPU fit outgrows its memory reserve (``gpu_ram_part``): raise, or abort?

Each share given is tried in a fresh process: fold 0 of survivors-98k, depth 8, 300 rounds. Printed per
share: the exit status, what the fit printed (its R^2, or the exception it raised) and the last lines
of stderr. On an H200 (catboost 1.2.10) 3e-4 (42 MiB) was enough and 1e-4 aborted the process with
NCudaLib::TOutOfMemoryError, so the tree pool, not the worker, retries such a trial.

    CUDA_VISIBLE_DEVICES=0 python bench/catboost_oom_probe.py 1e-4 3e-4 1e-3
"""

from __future__ import annotations

import subprocess
import sys

ONE_FIT = """
import sys
from watcher_plugins.data import embedded_survivors, kfold_splits
from watcher_plugins.tree_parallel.libraries import CatBoostFitter, FitSettings
ds = embedded_survivors(98784)
train, val = kfold_splits(ds.n_rows, 5, 42)[0]
settings = FitSettings(rounds=300, early_stopping_rounds=300, threads=2, use_gpu=True,
                       catboost_gpu_ram_part=float(sys.argv[1]))
fitter = CatBoostFitter()
fold = fitter.prepare_fold(ds.X[train], ds.y[train], ds.X[val], ds.y[val], settings)
try:
    print("ok", fitter.fit(fold, {"depth": 8, "learning_rate": 0.1}, 1, settings).score)
except Exception as exc:
    print("raised", type(exc).__name__, str(exc)[:300])
"""


def main(shares: list[str]) -> int:
    for share in shares:
        proc = subprocess.run([sys.executable, "-c", ONE_FIT, share], capture_output=True, text=True)
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        print(f"gpu_ram_part {share}: rc {proc.returncode}; stdout {proc.stdout.strip()[:300]!r}; "
              f"stderr tail {tail}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
