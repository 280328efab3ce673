"""A fitted linear model as numbers: its preprocessing, coefficients and intercepts, saved as JSON and
applied with numpy alone (no scikit-learn, no pickle).

Preprocessing, fitted on the training rows only (a held-out or new row never moves a statistic):

- a numeric feature's NaN becomes the training rows' median (0.0 where they hold no value at all), and a
  missing-indicator column (1.0 where it was NaN) follows it where the training rows had a missing value;
- a categorical feature (data.Dataset: category codes 0..k-1 as floats, NaN where missing) becomes one
  column per code the training rows hold (1.0 where the row holds it) and an "other" column for anything
  else: a code they never held, or a missing value;
- then every column is standardised with the training rows' mean and standard deviation (a constant
  column is centred and left unscaled).

On a dataset without missing values and categories the design matrix is ``X`` itself, so the numbers are
those of the plain standardised fit.

``ridge_model.json`` holds every number as Python's repr of the float (the json module's spelling), so that
reading it back gives the same bits, and ``LinearModel.predict`` computes column by column, without a BLAS
reduction whose order could depend on memory alignment: the predictions in the process that fitted the
model and in ``watcher-agent predict`` are equal exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from watcher_plugins.predict import ModelDirError

MODEL_FILE = "ridge_model.json"
FORMAT_VERSION = 1
REGRESSION, BINARY, MULTICLASS = "regression", "binary", "multiclass"  # tasks.TASKS
NUMERIC, CATEGORICAL = "numeric", "categorical"


@dataclass(frozen=True)
class Feature:
    """How one input column becomes design columns: a numeric one its value (``median`` where missing)
    and, with ``indicator``, a missing-indicator; a categorical one a column per code in ``codes`` and an
    "other" column."""

    index: int
    name: str
    kind: str
    median: float = 0.0
    indicator: bool = False
    codes: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return (1 + self.indicator) if self.kind == NUMERIC else len(self.codes) + 1

    def column_names(self, labels: Sequence[str] = ()) -> list[str]:
        if self.kind == NUMERIC:
            return [self.name] + ([f"{self.name} (missing)"] if self.indicator else [])
        spelled = [labels[c] if c < len(labels) else str(c) for c in self.codes]
        return [f"{self.name}={label}" for label in spelled] + [f"{self.name} (other)"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "name": self.name, "kind": self.kind}
        if self.kind == NUMERIC:
            out.update(median=self.median, indicator=self.indicator)
        else:
            out["codes"] = list(self.codes)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Feature:
        if obj["kind"] == NUMERIC:
            return cls(int(obj["index"]), str(obj["name"]), NUMERIC, median=float(obj["median"]),
                       indicator=bool(obj["indicator"]))
        if obj["kind"] == CATEGORICAL:
            return cls(int(obj["index"]), str(obj["name"]), CATEGORICAL, codes=tuple(int(c) for c in obj["codes"]))
        raise ValueError(f"feature kind {obj['kind']!r}: expected {NUMERIC!r} or {CATEGORICAL!r}")


@dataclass(frozen=True)
class Preprocessing:
    """The fitted preprocessing: ``features`` in input order, then standardisation by ``mean``/``scale``
    (one per design column)."""

    n_features: int
    features: tuple[Feature, ...]
    mean: np.ndarray
    scale: np.ndarray
    column_names: tuple[str, ...] = ()

    def design(self, X: np.ndarray) -> np.ndarray:
        """The design matrix before standardising: [rows, design columns], float64, C order."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got an array of shape {X.shape}")
        return _design(X, self.features)

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (self.design(X) - self.mean) / self.scale

    def to_json(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "features": [f.to_json() for f in self.features],
                "design_columns": list(self.column_names), "mean": _floats(self.mean),
                "scale": _floats(self.scale)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Preprocessing:
        features = tuple(Feature.from_json(f) for f in obj["features"])
        mean, scale = np.array(obj["mean"], dtype=np.float64), np.array(obj["scale"], dtype=np.float64)
        width = sum(f.width for f in features)
        if mean.shape != (width,) or scale.shape != (width,):
            raise ValueError(f"{width} design columns, but {mean.size} means and {scale.size} scales")
        return cls(int(obj["n_features"]), features, mean, scale, tuple(obj.get("design_columns", ())))


def _design(X: np.ndarray, features: Sequence[Feature]) -> np.ndarray:
    out = np.empty((X.shape[0], sum(f.width for f in features)), dtype=np.float64)
    d = 0
    for f in features:
        column = X[:, f.index]
        if f.kind == NUMERIC:
            missing = np.isnan(column)
            out[:, d] = np.where(missing, f.median, column)
            if f.indicator:
                out[:, d + 1] = missing
        else:
            for i, code in enumerate(f.codes):
                out[:, d + i] = column == float(code)
            out[:, d + len(f.codes)] = ~np.isin(column, np.array(f.codes, dtype=np.float64))  # NaN: not in it
        d += f.width
    return out


def fit_preprocessing(X_train: np.ndarray, categorical: Iterable[int] = (), feature_names: Sequence[str] = (),
                      categories: Mapping[str, Sequence[str]] | None = None) -> Preprocessing:
    """Fit the preprocessing on the training rows (and only on them). ``categorical``: the indices of
    the categorical features; ``feature_names`` and ``categories`` (the labels of each categorical
    feature's codes) only name the design columns."""
    X_train = np.asarray(X_train, dtype=np.float64)
    n_features = X_train.shape[1]
    names = list(feature_names) if len(feature_names) == n_features else [f"x{j}" for j in range(n_features)]
    categorical = set(categorical)
    features = []
    for j in range(n_features):
        column = X_train[:, j]
        present = column[~np.isnan(column)]
        if j in categorical:
            features.append(Feature(j, names[j], CATEGORICAL, codes=tuple(int(c) for c in np.unique(present))))
        else:
            median = float(np.median(present)) if present.size else 0.0
            features.append(Feature(j, names[j], NUMERIC, median=median, indicator=present.size < column.size))
    Z = _design(X_train, features)
    mean = Z.mean(axis=0)
    scale = Z.std(axis=0)
    scale[scale == 0] = 1.0  # a constant column: centred to 0, left unscaled
    labels = categories or {}
    column_names = tuple(n for f in features for n in f.column_names(labels.get(f.name, ())))
    return Preprocessing(n_features, tuple(features), mean, scale, column_names)


@dataclass(frozen=True)
class LinearModel:
    """A fitted linear model: ``coef`` [outputs, design columns] and ``intercept`` [outputs] on the
    standardised design. Regression: one output, the prediction. Classification: ``class_codes`` are the
    classes the fit saw (codes into the dataset's classes, ``n_classes`` of them); one output is the
    log-odds of the second of them, several the multinomial logits of each; a class the fit never saw
    gets probability 0."""

    task: str
    estimator: str
    preprocessing: Preprocessing
    coef: np.ndarray
    intercept: np.ndarray
    n_classes: int = 0
    class_codes: tuple[int, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def decision(self, X: np.ndarray) -> np.ndarray:
        """[rows, outputs]: intercept + sum over design columns of value x coefficient, in column order."""
        Z = self.preprocessing.transform(X)
        out = np.empty((Z.shape[0], self.coef.shape[0]), dtype=np.float64)
        out[:] = self.intercept
        for j in range(Z.shape[1]):  # elementwise products and sums: their rounding depends on nothing else
            out += Z[:, j:j + 1] * self.coef[:, j]
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions shaped as tasks.py says: regression [rows] values, binary [rows] probabilities of
        class 1, multiclass [rows, classes] probabilities."""
        decision = self.decision(X)
        if self.task == REGRESSION:
            return np.ascontiguousarray(decision[:, 0])
        if decision.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-decision[:, 0]))
            seen = np.column_stack([1.0 - p, p])
        else:
            shifted = decision - decision.max(axis=1, keepdims=True)
            e = np.exp(shifted)
            total = e[:, 0].copy()
            for c in range(1, e.shape[1]):
                total += e[:, c]
            seen = e / total[:, None]
        probabilities = np.zeros((decision.shape[0], self.n_classes), dtype=np.float64)
        probabilities[:, list(self.class_codes)] = seen
        return np.ascontiguousarray(probabilities[:, 1]) if self.task == BINARY else probabilities

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": FORMAT_VERSION, "task": self.task, "estimator": self.estimator,
                               "params": dict(self.params), "preprocessing": self.preprocessing.to_json(),
                               "coef": [_floats(row) for row in self.coef], "intercept": _floats(self.intercept)}
        if self.task != REGRESSION:
            out.update(n_classes=self.n_classes, class_codes=list(self.class_codes))
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LinearModel:
        if obj.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {obj.get('format_version')!r}: this watcher-ridge reads "
                             f"{FORMAT_VERSION}")
        task = obj["task"]
        if task not in (REGRESSION, BINARY, MULTICLASS):
            raise ValueError(f"task {task!r}: expected {REGRESSION}, {BINARY} or {MULTICLASS}")
        preprocessing = Preprocessing.from_json(obj["preprocessing"])
        coef = np.array(obj["coef"], dtype=np.float64)
        intercept = np.array(obj["intercept"], dtype=np.float64)
        if coef.ndim != 2 or coef.shape[1] != preprocessing.mean.size or intercept.shape != (coef.shape[0],):
            raise ValueError(f"coef of shape {coef.shape} and intercept of shape {intercept.shape} do not fit "
                             f"{preprocessing.mean.size} design columns")
        n_classes = int(obj.get("n_classes", 0))
        class_codes = tuple(int(c) for c in obj.get("class_codes", ()))
        if task != REGRESSION:
            outputs = 1 if len(class_codes) == 2 else len(class_codes)
            if coef.shape[0] != outputs or not all(0 <= c < n_classes for c in class_codes):
                raise ValueError(f"class_codes {list(class_codes)} of {n_classes} classes do not fit "
                                 f"{coef.shape[0]} outputs")
        elif coef.shape[0] != 1:
            raise ValueError(f"a regression has one output, not {coef.shape[0]}")
        return cls(task, str(obj["estimator"]), preprocessing, np.ascontiguousarray(coef), intercept, n_classes,
                   class_codes, dict(obj.get("params", {})))

    def save(self, model_dir: str | Path) -> Path:
        """Write ``ridge_model.json`` in model_dir (through a temporary file: never half of one)."""
        path = Path(model_dir) / MODEL_FILE
        tmp = path.with_name(f".{MODEL_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def load_model(model_dir: str | Path) -> LinearModel:
    """The model saved in model_dir; a missing or damaged file is a ModelDirError naming it."""
    path = Path(model_dir) / MODEL_FILE
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{path}: no such file: the ridge model is missing from its model directory") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelDirError(f"{path}: cannot read the ridge model: {exc}") from None
    try:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        return LinearModel.from_json(obj)
    except (KeyError, TypeError, ValueError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelDirError(f"{path}: not a ridge model: {what}") from None


def predict(model_dir: str | Path, X: np.ndarray) -> np.ndarray:
    """ModelType.predict of ``ridge``: the saved model applied to rows encoded as its training rows."""
    model = load_model(model_dir)
    try:
        return model.predict(X)
    except ValueError as exc:  # rows of another width
        raise ModelDirError(f"{Path(model_dir) / MODEL_FILE}: {exc}") from None


def _floats(values: Iterable[float]) -> list[float]:
    """Python floats (the json module writes their repr: they read back to the same bits)."""
    return [float(v) for v in values]
