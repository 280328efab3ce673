"""The NN's inputs from a dataset's encoded rows: imputation, missing indicators, one-hot categories and
the z-score, fitted on one set of rows (a fold's training rows, or every row for the saved model) and
applied to any rows.

``Preprocessing.fit(X_train, categorical, indicators)`` learns, from ``X_train`` alone:

- each numeric column's median (of its values that are not missing; 0.0 where none is): a missing value
  is replaced by it;
- each categorical column's vocabulary: the category codes present in ``X_train`` (sorted);
- the mean and standard deviation of every column of the design matrix below, over ``X_train``'s rows
  (a constant column's standard deviation is 1: it is centred only), as ``standardise`` computes them.

The design matrix of rows ``X`` (float64), column blocks in this order: the numeric columns (missing
values imputed), in column order; a 0/1 missing indicator for each column of ``indicators`` (numeric
columns: the caller names those with a missing value anywhere in the table, so that every fold's inputs
have the same indicators); for each categorical column, one 0/1 column per category of its vocabulary
and one "other" column, 1 where the row's category is not in the vocabulary (unseen in the fitted rows,
missing, or a code beyond the vocabulary). ``transform(X)`` is its z-score, rounded once to float32.

On a clean dataset (numeric, nothing missing) the design matrix is ``X`` itself and ``transform`` is
``standardise(X)``: the whole-dataset z-score the NN has always trained on (device_data.py).

The object is plain data and JSON round-trips exactly (``to_json``/``from_json``: floats as their
shortest repr), because a saved model applies it to new rows (saved.py). Only numpy here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 1


def standardise(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score per column (of a 2-D array; of the values, of a 1-D one), computed in float64, returned as
    float32 with the means and standard deviations it used (a constant column's is 1: it is centred only)."""
    a64 = a.astype(np.float64)
    mean = a64.mean(axis=0)
    std = np.atleast_1d(a64.std(axis=0))
    std[std == 0] = 1.0
    std = std.reshape(np.shape(mean))
    return ((a64 - mean) / std).astype(np.float32), mean, std


def missing_columns(X: np.ndarray, categorical: Sequence[int] = ()) -> tuple[int, ...]:
    """The numeric columns of ``X`` with a missing value (NaN) in any row."""
    skip = set(categorical)
    return tuple(int(j) for j in np.flatnonzero(np.isnan(X).any(axis=0)) if int(j) not in skip)


def needs_preprocessing(X: np.ndarray, categorical: Sequence[int] = ()) -> bool:
    """Whether ``X`` has a categorical column or a missing value: its NN inputs are then fitted per fold
    (a clean dataset keeps the one whole-dataset z-score)."""
    return bool(len(categorical)) or bool(np.isnan(X).any())


@dataclass(frozen=True)
class Preprocessing:
    """A fitted preprocessing (module docstring). Column indices are into the encoded rows ``X``."""

    n_columns: int
    numeric: tuple[int, ...]
    medians: tuple[float, ...]
    indicators: tuple[int, ...]
    categorical: tuple[int, ...]
    vocabularies: tuple[tuple[int, ...], ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, X_train: np.ndarray, categorical: Sequence[int] = (),
            indicators: Sequence[int] | None = None) -> Preprocessing:
        """Fitted on the rows of ``X_train`` alone. ``indicators``: the numeric columns that get a missing
        indicator (default: those with a missing value in ``X_train``)."""
        X_train = np.asarray(X_train, dtype=np.float64)
        if X_train.ndim != 2 or X_train.shape[0] == 0:
            raise ValueError(f"preprocessing is fitted on a 2-D array of at least one row, got shape {X_train.shape}")
        n_columns = int(X_train.shape[1])
        categorical = tuple(sorted(int(j) for j in categorical))
        numeric = tuple(j for j in range(n_columns) if j not in set(categorical))
        if indicators is None:
            indicators = missing_columns(X_train, categorical)
        indicators = tuple(sorted(int(j) for j in indicators))
        if any(j not in numeric for j in indicators):
            raise ValueError(f"missing indicators {indicators} name a column that is not numeric")
        medians = []
        for j in numeric:
            seen = X_train[:, j][~np.isnan(X_train[:, j])]
            medians.append(float(np.median(seen)) if len(seen) else 0.0)
        vocabularies = []
        for j in categorical:
            seen = X_train[:, j][~np.isnan(X_train[:, j])]
            vocabularies.append(tuple(int(c) for c in np.unique(seen)))
        unscaled = cls(n_columns, numeric, tuple(medians), indicators, categorical, tuple(vocabularies), (), ())
        _, mean, std = standardise(unscaled.design(X_train))
        return cls(n_columns, numeric, tuple(medians), indicators, categorical, tuple(vocabularies),
                   tuple(float(m) for m in mean), tuple(float(s) for s in std))

    @property
    def n_inputs(self) -> int:
        """Columns of the design matrix: the net's input width."""
        return len(self.numeric) + len(self.indicators) + sum(len(v) + 1 for v in self.vocabularies)

    def design(self, X: np.ndarray) -> np.ndarray:
        """The design matrix of ``X`` (float64, before the z-score)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_columns:
            raise ValueError(f"expected rows of {self.n_columns} encoded columns, got an array of shape {X.shape}")
        blocks = []
        if self.numeric:
            values = X[:, list(self.numeric)]
            blocks.append(np.where(np.isnan(values), np.asarray(self.medians, dtype=np.float64), values))
        if self.indicators:
            blocks.append(np.isnan(X[:, list(self.indicators)]).astype(np.float64))
        for j, vocabulary in zip(self.categorical, self.vocabularies):
            codes = X[:, j]
            onehot = np.zeros((X.shape[0], len(vocabulary) + 1), dtype=np.float64)
            for c, code in enumerate(vocabulary):
                onehot[:, c] = codes == code
            onehot[:, -1] = ~np.isin(codes, np.asarray(vocabulary, dtype=np.float64))  # NaN is in no vocabulary
            blocks.append(onehot)
        if not blocks:
            return np.empty((X.shape[0], 0), dtype=np.float64)
        return blocks[0] if len(blocks) == 1 else np.ascontiguousarray(np.concatenate(blocks, axis=1))

    def transform(self, X: np.ndarray) -> np.ndarray:
        """The net's inputs for rows ``X``: the design matrix's z-score with the fitted means and standard
        deviations, float32 [rows, n_inputs]."""
        if not self.mean:
            raise ValueError("this preprocessing has no fitted z-score")
        mean = np.asarray(self.mean, dtype=np.float64)
        std = np.asarray(self.std, dtype=np.float64)
        return ((self.design(X) - mean) / std).astype(np.float32)

    def input_names(self, feature_names: Sequence[str]) -> list[str]:
        """A name for each input column (for nn_model.json): the feature, ``f"{name} missing"``, ``f"{name}={code}"``
        and ``f"{name}=other"``."""
        names = [feature_names[j] for j in self.numeric] + [f"{feature_names[j]} missing" for j in self.indicators]
        for j, vocabulary in zip(self.categorical, self.vocabularies):
            names += [f"{feature_names[j]}={code}" for code in vocabulary] + [f"{feature_names[j]}=other"]
        return names

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "n_columns": self.n_columns, "numeric": list(self.numeric),
                "medians": list(self.medians), "indicators": list(self.indicators),
                "categorical": list(self.categorical), "vocabularies": [list(v) for v in self.vocabularies],
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Preprocessing:
        """The inverse of to_json; a ValueError says what is wrong with a damaged object."""
        if not isinstance(obj, Mapping) or obj.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"preprocessing: expected an object of format_version {FORMAT_VERSION}")
        try:
            made = cls(int(obj["n_columns"]), tuple(int(j) for j in obj["numeric"]),
                       tuple(float(m) for m in obj["medians"]), tuple(int(j) for j in obj["indicators"]),
                       tuple(int(j) for j in obj["categorical"]),
                       tuple(tuple(int(c) for c in v) for v in obj["vocabularies"]),
                       tuple(float(m) for m in obj["mean"]), tuple(float(s) for s in obj["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"preprocessing: a field is missing or of the wrong type ({type(exc).__name__}: {exc})") from None
        if len(made.medians) != len(made.numeric) or len(made.vocabularies) != len(made.categorical) \
                or len(made.mean) != made.n_inputs or len(made.std) != made.n_inputs:
            raise ValueError("preprocessing: its fields' lengths do not agree")
        return made
