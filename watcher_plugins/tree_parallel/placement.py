"""Which GPU and which CPU cores each tree worker gets.

GPU workers come first: one per GPU, then up to ``xgboost_per_gpu`` per GPU in all, spread round-robin
over the GPUs (XGBoost tolerates sharing a GPU: DESIGN measured four processes on one H200 at 1.4x
the work of one, though on survivors-98k sharing was slower; CatBoost does not, and the pool's
scheduler never lets a CatBoost trial share its GPU). The remaining
workers are CPU workers. Cores are split into disjoint near-equal shares, one per worker, and a
worker's libraries get as many threads as it has cores, so the pool never runs more threads than it
has cores: a worker beyond the cores is not started (only the first worker of each GPU may share a core,
where there are fewer cores than GPUs). A GPU worker may be given a larger share
(``gpu_worker_cores``): it trains XGBoost's folds in threads, one core each (see worker.py), and the CPU
workers split what is left; the larger share never costs a worker its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker process runs: a GPU (its index as CUDA_VISIBLE_DEVICES counts) or none, and
    the CPU cores it is pinned to. Unpinned (``pinned`` false, where a CPU quota leaves the pool fewer
    cores than its affinity holds), ``cores`` only counts its threads and the OS places them."""

    slot: int
    gpu: int | None
    cores: tuple[int, ...]
    pinned: bool = True

    @property
    def threads(self) -> int:
        return max(1, len(self.cores))

    def describe(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        cores = f"cores {_ranges(self.cores)}" if self.pinned else f"{self.threads} threads, unpinned"
        return f"worker {self.slot} ({where}, {cores})"

    def to_json(self) -> dict:
        return {"slot": self.slot, "gpu": self.gpu, "cores": list(self.cores), "pinned": self.pinned}

    @classmethod
    def from_json(cls, obj: dict) -> WorkerPlacement:
        return cls(slot=int(obj["slot"]), gpu=obj["gpu"], cores=tuple(obj["cores"]),
                   pinned=bool(obj.get("pinned", True)))


# One tree worker's host memory: the interpreter and libraries, then per cell (row x feature) of the data its
# copy and fold splits, and per cell and fold each library's per-fold datasets (kept for the pool's
# life). Peaks measured on CPU workers for 98,784 and 400,000 rows x 62 at 5 and 10 folds, rounded up
# (bench/results/2026-11-29-tree-worker-memory-cpu/): all three libraries, as a GPU worker or a worker of a pool
# without GPUs trains them; LightGBM only, as a CPU worker of a pool with GPUs does.
WORKER_MEMORY = {"all": (290e6, 18.0, 9.0), "lightgbm": (200e6, 10.0, 5.5)}  # base, per cell, per cell-fold


def worker_memory_bytes(rows: int, features: int, folds: int, lightgbm_only: bool) -> float:
    """About the most host memory one tree worker holds for data of ``rows`` x ``features`` in
    ``folds``-fold CV."""
    base, per_cell, per_cell_fold = WORKER_MEMORY["lightgbm" if lightgbm_only else "all"]
    return base + rows * features * (per_cell + per_cell_fold * folds)


def auto_gpu_worker_cores(fold_threads: int, n_cores: int, n_gpus: int) -> int | None:
    """The least cores a GPU worker gets when it trains ``fold_threads`` XGBoost folds at once: one per
    fold thread plus one for the worker itself, but never more than half the cores (split between the
    GPUs), so that CPU workers keep the other half. None (equal shares) when folds run one at a time.

    On an H200, 5 fold threads of survivors-98k ran 1.50x faster than one fold at a time (on 2 cores;
    more do not speed it up) when given 4 cores, 1.68x on 6, 1.67x on 8, 1.64x on 12, all with cudaMalloc
    (bench/results/2026-11-29-xgboost-fold-threads-h200/); 2.55x on 6 with CUDA's stream-ordered pool (2026-11-29-xgboost-async-pool-h200/).
    """
    if fold_threads <= 1 or n_gpus < 1:
        return None
    return max(1, min(fold_threads + 1, n_cores // (2 * n_gpus)))


def plan_placements(workers: int, gpus: Sequence[int], cores: Sequence[int],
                    xgboost_per_gpu: int = 1, gpu_worker_cores: int | None = None,
                    pinned: bool = True) -> list[WorkerPlacement]:
    """``workers`` placements: GPU workers first (slot i on ``gpus[i % len(gpus)]``, at most
    ``xgboost_per_gpu`` per GPU), the rest CPU workers.

    Every worker has a core share of its own; workers that would have none are left out. With
    ``gpu_worker_cores`` each GPU worker gets up to that many cores (never fewer than its equal share),
    as far as every CPU worker keeps a core, and the CPU workers split the rest.
    """
    if workers < 1:
        raise ValueError(f"tree_parallel_workers must be >= 1, got {workers}")
    if xgboost_per_gpu < 1:
        raise ValueError(f"xgboost_per_gpu must be >= 1, got {xgboost_per_gpu}")
    if gpu_worker_cores is not None and gpu_worker_cores < 1:
        raise ValueError(f"gpu_worker_cores must be >= 1, got {gpu_worker_cores}")
    cores = list(cores) or [0]
    n_first = min(workers, len(gpus))  # every GPU gets its worker, even with fewer cores than GPUs
    n_shared = min(workers - n_first, len(gpus) * (xgboost_per_gpu - 1), max(0, len(cores) - n_first))
    n_gpu = n_first + n_shared
    n_cpu = min(workers - n_gpu, max(0, len(cores) - n_gpu))
    if n_gpu + n_cpu == 0:
        n_cpu = 1
    total = n_gpu + n_cpu
    if len(cores) < total:  # more GPUs than cores: GPU workers must share cores, one each
        shares: list[tuple[int, ...]] = [(cores[i % len(cores)],) for i in range(total)]
    else:
        shares = _equal_shares(cores, total)
        if n_gpu and n_cpu and gpu_worker_cores:
            # A larger share for the GPU workers, as far as every CPU worker keeps a core of its own.
            size = min(gpu_worker_cores, (len(cores) - n_cpu) // n_gpu)
            if size > min(len(share) for share in shares[:n_gpu]):
                rest = cores[n_gpu * size:]
                shares = [tuple(cores[i * size:(i + 1) * size]) for i in range(n_gpu)] + _equal_shares(rest, n_cpu)
    total = len(shares)
    return [WorkerPlacement(slot=i, gpu=gpus[i % len(gpus)] if i < n_gpu else None, cores=shares[i], pinned=pinned)
            for i in range(total)]


def _equal_shares(cores: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """``cores`` split into ``n`` consecutive shares whose sizes differ by at most one."""
    base, extra = divmod(len(cores), n) if n else (0, 0)
    shares, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        shares.append(tuple(cores[start:start + size]))
        start += size
    return shares


def _ranges(cores: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'"""
    out: list[str] = []
    run: list[int] = []
    for c in cores:
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out) or "-"
