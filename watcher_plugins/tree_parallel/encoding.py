"""What the tree libraries are given of a dataset, and how their predictions come back.

The libraries hold features (and a regression target) in float32. A numeric column whose values do not
survive the cast to float32 exactly (a price with cents, a timestamp, a target with a large offset such
as y + 2e7, whose float32 cast leaves a handful of distinct values) is first centred and scaled in
float64, by the mean and standard deviation of all the dataset's rows (NaN left out), and then cast: the
cast keeps the column's relative detail instead of rounding it away. Trees split on thresholds, so
a feature's z-score changes no split a tree can make; a regression target's predictions are mapped
back to its units in float64. A column that is exact in float32 (the embedded survivors data, category
codes, class codes) is cast as it is: data without missing values, categories or inexact columns reach
the libraries as exactly the float32 arrays they got before datasets were float64.

Missing values stay NaN, which every library takes as missing. Categorical columns hold category codes
0..k-1 (NaN where missing); each library gets them its own way (libraries.py).

Only numpy here: the encoding is saved beside a model (``to_json``) and applied again to new rows by
saved.predict, with the same float64 arithmetic, so that new rows are encoded bit for bit as the
training rows were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from watcher_plugins.tasks import BINARY, MULTICLASS, REGRESSION, TASKS


def exact_in_float32(values: np.ndarray) -> bool:
    """Whether every value (NaN included) comes back unchanged from a float32 cast."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)
    return bool(np.array_equal(cast, values, equal_nan=True))


@dataclass(frozen=True)
class ZScore:
    """A column's centring and scaling, in float64: ``(x - mean) / std``, and back."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: np.ndarray) -> ZScore:
        """The z-score of ``values``' finite entries (NaN ignored); a constant column is only centred."""
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if finite.size else 0.0
        std = float(finite.std()) if finite.size else 1.0
        return cls(mean, std if np.isfinite(std) and std > 0 else 1.0)

    def forward(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.mean) / self.std

    def back(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) * self.std + self.mean

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}  # floats as JSON numbers read back to the same bits

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ZScore:
        return cls(float(obj["mean"]), float(obj["std"]))


@dataclass(frozen=True)
class TreeEncoding:
    """How one dataset's rows become a tree library's inputs, and its outputs predictions (tasks.py).

    :param feature_names: the features, in column order.
    :param categorical: indices of the categorical columns (codes 0..k-1, NaN where missing).
    :param task: regression, binary or multiclass.
    :param n_classes: the number of classes (0 for regression).
    :param feature_scaling: column index -> the z-score applied before its float32 cast.
    :param target_scaling: the regression target's z-score, or None.
    """

    feature_names: tuple[str, ...]
    categorical: tuple[int, ...] = ()
    task: str = REGRESSION
    n_classes: int = 0
    feature_scaling: Mapping[int, ZScore] = field(default_factory=dict)
    target_scaling: ZScore | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        object.__setattr__(self, "categorical", tuple(sorted(int(i) for i in self.categorical)))
        object.__setattr__(self, "feature_scaling", {int(k): v for k, v in sorted(self.feature_scaling.items())})

    @classmethod
    def of(cls, dataset: Any) -> TreeEncoding:
        """The encoding of a data.Dataset: which numeric columns and target need a z-score before float32."""
        X = np.asarray(dataset.X, dtype=np.float64)
        categorical = tuple(dataset.categorical_columns)
        scaling = {j: ZScore.of(X[:, j]) for j in range(X.shape[1])
                   if j not in categorical and not exact_in_float32(X[:, j])}
        target = None
        if dataset.task == REGRESSION and not exact_in_float32(dataset.y):
            target = ZScore.of(dataset.y)
        n_classes = 0 if dataset.task == REGRESSION else max(len(dataset.classes), 2)
        return cls(tuple(dataset.feature_names), categorical, dataset.task, n_classes, scaling, target)

    @classmethod
    def plain(cls, n_features: int) -> TreeEncoding:
        """Regression on numeric columns cast as they are (what the trees got before tables: benches, tests)."""
        return cls(tuple(f"f{j}" for j in range(n_features)))

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def is_plain(self) -> bool:
        """No category, no scaling, regression: today's float32 path, untouched."""
        return not self.categorical and not self.feature_scaling and self.target_scaling is None \
            and self.task == REGRESSION

    @property
    def numeric(self) -> tuple[int, ...]:
        """Indices of the numeric columns, in column order."""
        categorical = set(self.categorical)
        return tuple(j for j in range(self.n_features) if j not in categorical)

    def features(self, X: np.ndarray) -> np.ndarray:
        """Rows as the libraries take them: float32 [rows, features], scaled columns z-scored first."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got an array of shape {X.shape}")
        with np.errstate(over="ignore"):  # a column beyond float32's range is one of those scaled
            out = X.astype(np.float32)  # a copy: the columns scaled below are written over
        for j, scaling in self.feature_scaling.items():
            out[:, j] = scaling.forward(X[:, j]).astype(np.float32)
        return out

    def target(self, y: np.ndarray) -> np.ndarray:
        """The target as the libraries train on it: float32, z-scored first where it needs it."""
        y = np.asarray(y)
        if self.target_scaling is not None:
            return self.target_scaling.forward(y).astype(np.float32)
        return y.astype(np.float32)

    def predictions(self, raw: np.ndarray) -> np.ndarray:
        """A library's predictions (values in the target's training units, the probability of class 1, or
        [rows, classes] probabilities) as tasks.py scores them: float64, a regression target's units."""
        raw = np.asarray(raw, dtype=np.float64)
        if self.task == REGRESSION:
            raw = raw.reshape(-1)
            return self.target_scaling.back(raw) if self.target_scaling is not None else raw
        if self.task == BINARY:
            return raw.reshape(-1)
        return raw.reshape(raw.shape[0], self.n_classes)

    def categorical_names(self) -> list[str]:
        return [self.feature_names[j] for j in self.categorical]

    def to_json(self) -> dict[str, Any]:
        return {
            "feature_names": list(self.feature_names),
            "categorical": self.categorical_names(),
            "task": self.task,
            "n_classes": self.n_classes,
            "feature_scaling": {self.feature_names[j]: z.to_json() for j, z in self.feature_scaling.items()},
            "target_scaling": self.target_scaling.to_json() if self.target_scaling is not None else None,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TreeEncoding:
        names: Sequence[str] = list(obj["feature_names"])
        index = {name: j for j, name in enumerate(names)}
        target = obj.get("target_scaling")
        return cls(tuple(names), tuple(index[name] for name in obj.get("categorical", [])), obj["task"],
                   int(obj.get("n_classes", 0)),
                   {index[name]: ZScore.from_json(z) for name, z in obj.get("feature_scaling", {}).items()},
                   ZScore.from_json(target) if target is not None else None)


__all__ = ["BINARY", "MULTICLASS", "REGRESSION", "TreeEncoding", "ZScore", "exact_in_float32"]
