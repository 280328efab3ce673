"""Datasets kept on the worker's device: loaded once, standardised once, with their k-fold row sets.

Standardisation is a whole-dataset z-score of every feature and of the target (mean and standard
deviation over all rows, in float64; a constant feature is centred only). It is a property of the
dataset, not of a fold or of a batch, so every trainer and every fold sees the same numbers. The target
is standardised because the net starts near 0 and Adam moves it by about lr a step: a target in the
hundreds of thousands (a price) would never be reached, and the NN's R² would depend on the target's
units where the trees' does not. R² is computed in the target's own units, in float64 (predictions
are mapped back), as the trees' is; the best epoch does not change under the map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from watcher_plugins.data import Dataset, kfold_splits, load_dataset
from watcher_plugins.records import DataRef


def standardise(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-dataset z-score per column (of a 2-D array; of the values, of a 1-D one), computed in
    float64, returned as float32 with the means and standard deviations it used (a constant column's
    is 1: it is centred only)."""
    a64 = a.astype(np.float64)
    mean = a64.mean(axis=0)
    std = np.atleast_1d(a64.std(axis=0))
    std[std == 0] = 1.0
    std = std.reshape(np.shape(mean))
    return ((a64 - mean) / std).astype(np.float32), mean, std


@dataclass(frozen=True)
class FoldRows:
    """One fold's rows: indices (sorted, on the device), the training-row mask, the held-out rows on the host."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor
    train_rows: torch.Tensor  # bool [n_rows]
    val_idx_host: np.ndarray


@dataclass
class DeviceDataset:
    key: str
    X: torch.Tensor  # [n_rows, n_features] float32, standardised
    y: torch.Tensor  # [n_rows] float32, standardised: what the nets are trained on
    y_host: np.ndarray  # [n_rows] the target as loaded, in its own units: what R² is computed against
    y_mean: float = 0.0  # the standardisation of y, to bring predictions back to its units
    y_std: float = 1.0
    _folds: dict[tuple[int, int], list[FoldRows]] = field(default_factory=dict, repr=False)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def in_target_units(self, pred: np.ndarray) -> np.ndarray:
        """Predictions of the standardised target, in the target's own units (float64)."""
        return np.asarray(pred, dtype=np.float64) * self.y_std + self.y_mean

    def fold(self, folds: int, seed: int, fold_idx: int) -> FoldRows:
        """data.kfold_splits(n_rows, folds, seed)[fold_idx], on the device, cached."""
        if (folds, seed) not in self._folds:
            device = self.X.device
            entries = []
            for train, val in kfold_splits(self.n_rows, folds, seed):
                train_rows = torch.zeros(self.n_rows, dtype=torch.bool)
                train_rows[torch.from_numpy(train)] = True
                entries.append(FoldRows(
                    train_idx=torch.from_numpy(train).to(device), val_idx=torch.from_numpy(val).to(device),
                    train_rows=train_rows.to(device), val_idx_host=val,
                ))
            self._folds[(folds, seed)] = entries
        return self._folds[(folds, seed)][fold_idx]

    @classmethod
    def from_dataset(cls, key: str, dataset: Dataset, device: torch.device) -> DeviceDataset:
        X, _, _ = standardise(dataset.X)
        y, y_mean, y_std = standardise(np.asarray(dataset.y))
        return cls(key=key, X=torch.from_numpy(X).to(device), y=torch.from_numpy(y).to(device),
                   y_host=np.asarray(dataset.y, dtype=np.float32), y_mean=float(y_mean), y_std=float(y_std))


class DeviceDatasetCache:
    """Datasets by DataRef key; each is read from disk and copied to the device once per worker."""

    def __init__(self, device: torch.device):
        self.device = device
        self._datasets: dict[str, DeviceDataset] = {}

    def get(self, ref: DataRef) -> DeviceDataset:
        if ref.key not in self._datasets:
            self._datasets[ref.key] = DeviceDataset.from_dataset(ref.key, load_dataset(ref), self.device)
        return self._datasets[ref.key]

    def __len__(self) -> int:
        return len(self._datasets)
