"""Datasets kept on the worker's device: loaded once, preprocessed, with their k-fold row sets.

A clean dataset (numeric, nothing missing) is standardised once: a whole-dataset z-score of every
feature (mean and standard deviation over all rows, in float64; a constant feature is centred only). It
is then a property of the dataset, not of a fold or of a batch, so every trainer and every fold sees the
same numbers: one DeviceDataset for every fold.

A dataset with a missing value or a categorical column gets one DeviceDataset per fold (per data,
folds, seed and fold index), whose inputs are preprocess.py's preprocessing fitted on that fold's
training rows only (medians, missing indicators, one-hot vocabularies, z-score) and applied to all its
rows; nothing of its held-out rows reaches those statistics. Fits of one fold share it; packs group fits
by dataset (fused.py), so a pack never mixes folds of such a dataset.

The target: a regression target is standardised (whole-dataset z-score, in float64) because the net
starts near 0 and Adam moves it by about lr a step: a target in the hundreds of thousands (a price)
would never be reached, and the NN's R² would depend on the target's units where the trees' does not.
Scores are computed in the target's own units, in float64 (predictions are mapped back, heads.py), as
the trees' are; the best epoch does not change under the map. A class target is its codes 0..C-1,
unscaled (binary: one logit; multiclass: one per class).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from watcher_plugins.data import Dataset, kfold_splits, load_dataset
from watcher_plugins.errors import DataError
from watcher_plugins.nn_batch import heads
from watcher_plugins.nn_batch.preprocess import (
    Preprocessing,
    missing_columns,
    needs_preprocessing,
    standardise,
)
from watcher_plugins.records import DataRef
from watcher_plugins.tasks import MULTICLASS, REGRESSION

__all__ = ["DeviceDataset", "DeviceDatasetCache", "FoldRows", "all_rows", "standardise"]


@dataclass(frozen=True)
class FoldRows:
    """One fold's rows: indices (sorted, on the device), the training-row mask, the held-out rows on the host."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor
    train_rows: torch.Tensor  # bool [n_rows]
    val_idx_host: np.ndarray

    @property
    def n_val(self) -> int:
        return len(self.val_idx_host)


def all_rows(n_rows: int, device: torch.device) -> FoldRows:
    """Every row a training row, none held out: the rows of the fit on every row (a refit)."""
    idx = torch.arange(n_rows, device=device)
    return FoldRows(train_idx=idx, val_idx=idx[:0], train_rows=torch.ones(n_rows, dtype=torch.bool, device=device),
                    val_idx_host=np.empty(0, dtype=np.int64))


@dataclass
class DeviceDataset:
    key: str
    X: torch.Tensor  # [n_rows, n_inputs] float32, preprocessed and standardised
    y: torch.Tensor  # [n_rows] float32: the standardised target (regression) or the class codes
    y_host: np.ndarray  # [n_rows] float64, the target as loaded (its own units, or class codes): what scores are computed against
    y_mean: float = 0.0  # the standardisation of a regression target, to bring predictions back to its units
    y_std: float = 1.0
    task: str = REGRESSION
    n_classes: int = 0
    #: (folds, seed, fold_idx) of the fold whose training rows its preprocessing was fitted on; None where
    #: it serves every fold (a clean dataset) or none (every row, for a refit)
    fitted_for: tuple[int, int, int] | None = None
    preprocessing: Preprocessing | None = None
    y_codes: torch.Tensor | None = None  # [n_rows] int64 class codes (multiclass)
    _folds: dict[tuple[int, int], list[FoldRows]] = field(default_factory=dict, repr=False)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        """The net's input width (columns of X, after preprocessing)."""
        return int(self.X.shape[1])

    @property
    def n_outputs(self) -> int:
        return heads.n_outputs(self.task, self.n_classes)

    def in_target_units(self, pred: np.ndarray) -> np.ndarray:
        """Predictions of the standardised target, in the target's own units (float64)."""
        return np.asarray(pred, dtype=np.float64) * self.y_std + self.y_mean

    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        """The net's outputs as predictions (heads.py: values in the target's units, or probabilities)."""
        return heads.predictions(outputs, self.task, self.y_mean, self.y_std)

    def fold(self, folds: int, seed: int, fold_idx: int) -> FoldRows:
        """data.kfold_splits(n_rows, folds, seed)[fold_idx], on the device, cached. A dataset whose
        preprocessing was fitted on one fold's training rows gives that fold alone."""
        if self.fitted_for is not None and self.fitted_for != (folds, seed, fold_idx):
            raise ValueError(f"dataset {self.key} was preprocessed for fold {self.fitted_for}, not "
                             f"{(folds, seed, fold_idx)}")
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
    def from_dataset(cls, key: str, dataset: Dataset, device: torch.device,
                     preprocessing: Preprocessing | None = None,
                     fitted_for: tuple[int, int, int] | None = None) -> DeviceDataset:
        """On the device: ``preprocessing``'s inputs of every row, or (None) the whole-dataset z-score of
        a clean dataset's features; the target as the module docstring says."""
        if preprocessing is None:
            X, _, _ = standardise(dataset.X)
        else:
            X = preprocessing.transform(dataset.X)
        y_host = np.asarray(dataset.y, dtype=np.float64)
        n_classes = len(dataset.classes)
        y_codes = None
        if dataset.task == REGRESSION:
            y, y_mean, y_std = standardise(np.asarray(dataset.y))
            mean, std = float(y_mean), float(y_std)
        else:
            y, mean, std = y_host.astype(np.float32), 0.0, 1.0
            if dataset.task == MULTICLASS:
                y_codes = torch.from_numpy(y_host.astype(np.int64)).to(device)
        return cls(key=key, X=torch.from_numpy(X).to(device), y=torch.from_numpy(y).to(device), y_host=y_host,
                   y_mean=mean, y_std=std, task=dataset.task, n_classes=n_classes, fitted_for=fitted_for,
                   preprocessing=preprocessing, y_codes=y_codes)


def fold_preprocessing(dataset: Dataset, folds: int, seed: int, fold_idx: int) -> Preprocessing:
    """The preprocessing of one fold: fitted on its training rows alone; the missing indicators of the
    columns with a missing value anywhere in the table (the same inputs' layout in every fold)."""
    train, _ = kfold_splits(dataset.n_rows, folds, seed)[fold_idx]
    categorical = dataset.categorical_columns
    return Preprocessing.fit(dataset.X[train], categorical, missing_columns(dataset.X, categorical))


def full_preprocessing(dataset: Dataset) -> Preprocessing:
    """The preprocessing fitted on every row (the fit a refit saves)."""
    categorical = dataset.categorical_columns
    return Preprocessing.fit(dataset.X, categorical, missing_columns(dataset.X, categorical))


class DeviceDatasetCache:
    """Datasets by DataRef key; each is read from disk once per worker and copied to the device once per
    fold that needs it (once in all for a clean dataset)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._loaded: dict[str, Dataset] = {}
        self._datasets: dict[str, DeviceDataset] = {}

    def dataset(self, ref: DataRef) -> Dataset:
        """The dataset as loaded (host, float64), read once."""
        if ref.key not in self._loaded:
            self._loaded[ref.key] = load_dataset(ref)
        return self._loaded[ref.key]

    def is_clean(self, ref: DataRef) -> bool:
        dataset = self.dataset(ref)
        return not needs_preprocessing(dataset.X, dataset.categorical_columns)

    def get(self, ref: DataRef) -> DeviceDataset:
        """A clean dataset's one DeviceDataset, for every fold (a DataError for one that needs
        preprocessing per fold: ``for_fold``)."""
        if ref.key not in self._datasets:
            dataset = self.dataset(ref)
            if not self.is_clean(ref):
                raise DataError(f"{dataset.name}: has missing values or categorical columns: its NN inputs are "
                                "preprocessed per fold (DeviceDatasetCache.for_fold)")
            self._datasets[ref.key] = DeviceDataset.from_dataset(ref.key, dataset, self.device)
        return self._datasets[ref.key]

    def for_fold(self, ref: DataRef, folds: int, seed: int, fold_idx: int) -> DeviceDataset:
        """The DeviceDataset a fit of this fold trains on: ``get(ref)`` for a clean dataset, else the one
        whose preprocessing was fitted on this fold's training rows."""
        if self.is_clean(ref):
            return self.get(ref)
        key = f"{ref.key}|folds={folds}|seed={seed}|fold={fold_idx}"
        if key not in self._datasets:
            dataset = self.dataset(ref)
            self._datasets[key] = DeviceDataset.from_dataset(
                key, dataset, self.device, fold_preprocessing(dataset, folds, seed, fold_idx), (folds, seed, fold_idx))
        return self._datasets[key]

    def __len__(self) -> int:
        return len(self._datasets)
