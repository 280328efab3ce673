"""The issue's mixed batch of fits and a plain nn.Sequential + torch.optim.Adam reference, shared by
the CPU tests, their GPU twins and bench/nn_gpu_agreement.py.

The batch mixes widths ([256,128,64], [128,64,32], [512,256,128]), depths (2, 3 and 4 hidden layers),
folds, learning rates, weight decay and dropout. At 600 rows and at most 40 epochs the plain reference
agrees with itself far inside 1e-4 when only the order of its sums changes (``plain_fit`` with
``row_order_seed``), so 1e-4 measures the packs against it there. At 4,000 rows and 80 epochs it does
not: reordered, it moved by up to 3.5e-3 on a CPU and 1.4e-3 on an H200
(bench/results/2026-11-29-nn-agreement-h200-cpu).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from watcher_plugins.data import r2_score
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.dropout import dropout_mask, fit_key
from watcher_plugins.nn_batch.model import initial_parameters
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


def fit_tasks(cache: DeviceDatasetCache, ref: DataRef = DATA, specs: Sequence[tuple] = MIXED,
              seed: int = SEED) -> list[FitTask]:
    """The fits of `specs` on the dataset `ref` (loaded once into `cache`), with FOLDS folds and `seed`."""
    data = cache.get(ref)
    return [FitTask.build(FitJob(trial, fold, FOLDS, seed, tuple(hidden), lr, wd, dropout, ref), data)
            for trial, fold, hidden, lr, wd, dropout in specs]


def plain_fit(task: FitTask, settings: TrainSettings, row_order_seed: int | None = None) -> tuple[float, int]:
    """(R², best epoch) of the fit trained by a plain nn.Sequential and torch.optim.Adam, written out as
    training.py's semantics say: training rows through nn.Linear/nn.ReLU with the fit's dropout masks,
    F.mse_loss, held-out rows without dropout, early stopping on the held-out loss. With
    ``row_order_seed`` its training rows come in a random order: the same sums added in another order
    (a mask follows its row), which measures how far rounding alone moves a fit (the rounding floor)."""
    data, job, rows = task.data, task.job, task.rows
    train_idx = rows.train_idx
    if row_order_seed is not None:
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(row_order_seed))
        train_idx = train_idx[order.to(train_idx.device)]
    widths = [data.n_features, *job.hidden_layers]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 1)).to(data.X.device)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for module, (weight, bias) in zip(linears, initial_parameters(data.n_features, job.hidden_layers,
                                                                      task.init_seed)):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    X_train, y_train = data.X[train_idx], data.y[train_idx]
    X_val, y_val = data.X[rows.val_idx], data.y[rows.val_idx]
    key = fit_key(task.init_seed)

    def forward(x: torch.Tensor, epoch: int | None = None) -> torch.Tensor:
        for i, module in enumerate(model):
            x = module(x)
            if epoch is not None and job.dropout > 0 and isinstance(module, nn.ReLU):
                x = x * dropout_mask(key, epoch, i // 2, train_idx, x.shape[1], job.dropout)
        return x.squeeze(-1)

    best_loss, best_epoch, best_pred = float("inf"), -1, None
    for epoch in range(settings.max_epochs):
        with torch.no_grad():
            pred_val = forward(X_val)
        val_loss = float(F.mse_loss(pred_val, y_val))
        if val_loss < best_loss:
            best_loss, best_epoch, best_pred = val_loss, epoch, pred_val.clone()
        if epoch - best_epoch >= settings.patience or epoch == settings.max_epochs - 1:
            break
        optimizer.zero_grad()
        F.mse_loss(forward(X_train, epoch), y_train).backward()
        optimizer.step()
    r2 = r2_score(data.y_host[rows.val_idx_host], data.in_target_units(best_pred.cpu().numpy()))
    return r2, best_epoch


def outcomes(trainer, tasks: Sequence[FitTask], n_concurrent: int) -> dict:
    """Each fit's outcome by key, trained by `trainer` with up to `n_concurrent` at once."""
    got = {}
    trainer.train(tasks, n_concurrent, lambda outcome: got.__setitem__(outcome.key, outcome))
    return got
