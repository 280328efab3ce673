"""Which GPU and which CPU cores each tree worker gets.

A GPU worker owns one GPU (CatBoost must never share one: two CatBoost processes on one H200 ran 2x
slower than one) and drives it from its own cores; the remaining workers are CPU workers. Cores are
split into disjoint near-equal shares, one per worker, and a worker's libraries get as many threads
as it has cores, so the pool never runs more threads than it has cores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker process runs: a GPU (its index as CUDA_VISIBLE_DEVICES counts) or none, and
    the CPU cores it is pinned to."""

    slot: int
    gpu: int | None
    cores: tuple[int, ...]

    @property
    def threads(self) -> int:
        return max(1, len(self.cores))

    def describe(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        return f"worker {self.slot} ({where}, cores {_ranges(self.cores)})"

    def to_json(self) -> dict:
        return {"slot": self.slot, "gpu": self.gpu, "cores": list(self.cores)}

    @classmethod
    def from_json(cls, obj: dict) -> WorkerPlacement:
        return cls(slot=int(obj["slot"]), gpu=obj["gpu"], cores=tuple(obj["cores"]))


def available_cores(limit: int | None = None) -> list[int]:
    """The cores this process may run on (its affinity), the first ``limit`` of them."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return cores[:limit] if limit else cores


def plan_placements(workers: int, gpus: Sequence[int], cores: Sequence[int]) -> list[WorkerPlacement]:
    """``workers`` placements: one GPU worker per GPU (up to ``workers``), the rest CPU workers.

    CPU workers are capped so that each has a core of its own; GPU workers come first.
    """
    if workers < 1:
        raise ValueError(f"tree_parallel_workers must be >= 1, got {workers}")
    cores = list(cores) or [0]
    n_gpu = min(workers, len(gpus))
    n_cpu = min(workers - n_gpu, max(0, len(cores) - n_gpu))
    if n_gpu + n_cpu == 0:
        n_cpu = 1
    total = n_gpu + n_cpu
    if len(cores) >= total:
        base, extra = divmod(len(cores), total)
        shares, start = [], 0
        for i in range(total):
            size = base + (1 if i < extra else 0)
            shares.append(tuple(cores[start:start + size]))
            start += size
    else:  # more GPUs than cores: GPU workers must share cores, one each
        shares = [(cores[i % len(cores)],) for i in range(total)]
    return [WorkerPlacement(slot=i, gpu=gpus[i] if i < n_gpu else None, cores=shares[i]) for i in range(total)]


def _ranges(cores: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'"""
    out, run = [], []
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
