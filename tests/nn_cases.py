"""The issue's mixed batch of fits, shared by the CPU trainer tests, their GPU twins and
bench/nn_gpu_agreement.py.

The batch mixes widths ([256,128,64], [128,64,32], [512,256,128]), depths (2, 3 and 4 hidden layers),
folds, learning rates, weight decay and dropout. At 600 rows and at most 40 epochs serial agrees with
itself to 1.3e-5 (CPU) and 5e-8 (H200) when only the order of its sums changes
(`with_reordered_training_rows`), so a 1e-4 contract measures the trainers there. At 4,000 rows and 80
epochs it does not: reordered, serial moves by up to 3.5e-3 on a CPU and 1.4e-3 on an H200
(bench/results/nn_agreement_session9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from watcher_plugins.nn_batch import affine
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.nn_batch.training import FitTask, TrainSettings
from watcher_plugins.records import DataRef

DATA = DataRef(embedded="survivors", rows=600)
SETTINGS = TrainSettings(max_epochs=40, patience=6)
FOLDS, SEED = 3, 11
#: (trial, fold, hidden_layers, lr, weight_decay, dropout)
MIXED = [
    (0, 0, [256, 128, 64], 3e-3, 1e-4, 0.0),
    (0, 1, [256, 128, 64], 3e-3, 1e-4, 0.0),
    (1, 2, [128, 64, 32], 1e-2, 0.0, 0.2),
    (2, 0, [512, 256, 128], 1e-3, 1e-5, 0.1),
    (3, 1, [128, 64], 5e-3, 0.0, 0.0),
    (4, 2, [256, 128], 2e-2, 1e-3, 0.15),
    (5, 0, [64, 32, 16, 8], 1e-2, 0.0, 0.0),
    (6, 1, [256, 128, 64, 32], 2e-3, 1e-6, 0.25),
]


def fit_tasks(cache: DeviceDatasetCache, ref: DataRef = DATA, specs: Sequence[tuple] = MIXED) -> list[FitTask]:
    """The fits of `specs` on the dataset `ref` (loaded once into `cache`), with FOLDS folds and SEED."""
    data = cache.get(ref)
    return [FitTask.build(FitJob(trial, fold, FOLDS, SEED, tuple(hidden), lr, wd, dropout, ref), data)
            for trial, fold, hidden, lr, wd, dropout in specs]


def with_reordered_training_rows(tasks: Sequence[FitTask], seed: int | None = None) -> list[FitTask]:
    """The same fits with their training rows in another order (reversed, or a random permutation drawn
    with `seed`): for serial and streams, which index the rows, every loss and gradient is the same sum
    added in another order (dropout masks follow the row, not its position). FoldRows' indices are no
    longer sorted, on purpose. Fused reads the fold's row mask, not these indices: nothing changes for it."""

    def reordered(idx: torch.Tensor) -> torch.Tensor:
        if seed is None:
            return idx.flip(0)
        order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
        return idx[order.to(idx.device)]

    return [dataclasses.replace(task, rows=dataclasses.replace(task.rows, train_idx=reordered(task.rows.train_idx)))
            for task in tasks]


def record_weight_grad_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """Records (n_in, n_out, splits) of every weight gradient a fused pack computes from here on."""
    calls = []
    weight_grad = affine.weight_grad

    def recorded(a, b, splits):
        calls.append((a.shape[-1], b.shape[-1], splits))
        return weight_grad(a, b, splits)

    monkeypatch.setattr(affine, "weight_grad", recorded)
    return calls


def outcomes(trainer, tasks: Sequence[FitTask], n_concurrent: int) -> dict:
    """Each fit's outcome by key, trained by `trainer` with up to `n_concurrent` at once."""
    got = {}
    trainer.train(tasks, n_concurrent, lambda outcome: got.__setitem__(outcome.key, outcome))
    return got
