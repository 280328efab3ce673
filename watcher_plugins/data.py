"""Datasets: the embedded synthetic survivors data, loaders for users' files, and seeded k-fold splits.

A user's file (CSV, parquet, JSON records, npz) becomes a :class:`Dataset`: features ``X`` and target
``y`` in float64, the task (regression, binary, multiclass) and, for classification, the class labels.

- **Missing values** are NaN in ``X``: an empty (or all-space) cell in any format; in a CSV also the
  markers in ``NA_MARKERS`` ("NA", "N/A", "NaN", "nan", "null", "NULL", "None", "#N/A"), compared
  exactly after surrounding spaces are stripped; null in JSON and parquet; a NaN float (parquet, npz).
  inf and -inf are not missing: they are a problem ("non-finite value").
- **Column kinds**: a column is numeric when every value that is not missing is a number (in a CSV one
  that Python's float() reads, but not "1_000" or non-ASCII digits; in JSON and parquet a number, never
  a string). A column of booleans (JSON/parquet booleans, or a CSV column of only True/False/true/false)
  is categorical with the vocabulary ("False", "True"). Anything else (text, a mix, a parquet dictionary
  column such as pandas' ``category``) is categorical: codes 0..k-1 (as floats, NaN where missing) into
  its vocabulary of labels, sorted (numerically where every label is a number). The data param's
  ``categorical`` lists columns to read as categories besides: their values as labels, as a CSV writes
  them ("1", "1.0"), or as Python spells a typed value (1 -> "1", 1.0 -> "1.0", True -> "True").
  Surrounding spaces are not part of a label.
- **High cardinality**: a categorical column with more than ``MAX_CATEGORIES`` (256) distinct values, or
  the data param's ``max_categories``, keeps the ``max_categories - 1`` most frequent (ties by label) and
  reads the rest as one category "(other)", the last code; a DataWarning names the column.
- **The target** and the task: the data param's ``task`` ("auto" by default) or inferred: a categorical,
  boolean or text target is binary with 2 classes, multiclass with more; a numeric target with exactly two
  distinct values is binary (classes "0", "1" for a 0/1 target); any other numeric target is regression.
  Class targets are codes 0..C-1 into ``classes`` (sorted). A row without a target value is a problem,
  unless the data param's ``drop_missing_target`` is true: then it is dropped, with a DataWarning.
- **Problems**: everything wrong with the values is found in one pass and raised as one DataError with a
  line per problem, each naming the file, the column, its first rows (counted from 1: "data row" in a CSV
  or parquet file, "record" in JSON) and what was expected. What keeps a file from being read at all
  (missing, not valid CSV, duplicate column names, no target column) is an error at once.

A model's inputs for new rows come from :func:`load_features` (or :func:`encode_rows`) with the
:class:`FeatureSchema` of the data it was trained on (``Dataset.schema()``), which holds the vocabularies.

Only numpy here (pyarrow lazily, for .parquet), so that any worker process can import it without pulling
in a CUDA framework.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np

from watcher_plugins.columns import (
    BOOL_CATEGORIES,
    MAX_CATEGORIES,
    NA_MARKERS,
    OTHER_CATEGORY,
    Column,
    DataWarning,
    build_feature,
    build_target,
    encode_feature,
    warn,
)
from watcher_plugins.errors import DataError
from watcher_plugins.readers import (
    _FORMATS,
    _ROW_NAMES,
    DATA_FORMATS,
    NUMBERS,
    TEXT,
    VALUES,
    RawColumn,
    Table,
    names,
    read_table,
    resolve_format,
)
from watcher_plugins.records import DataRef
from watcher_plugins.tasks import REGRESSION, TASKS

__all__ = [
    "BOOL_CATEGORIES", "CACHE_ENV", "DATA_FORMATS", "EMBEDDED_DEFAULT_ROWS", "FULL_ROWS", "MAX_CATEGORIES",
    "NA_MARKERS", "N_FEATURES", "OTHER_CATEGORY", "TASK_CHOICES", "DataError", "DataWarning", "Dataset",
    "FeatureSchema", "cache_dir", "embedded_survivors", "encode_rows", "kfold_splits", "load_dataset",
    "load_features", "r2_score", "_FORMATS", "_ROW_NAMES",
]

N_FEATURES = 62
FULL_ROWS = 98_784  # the seed's survivors count
_SURVIVORS_SEED = 20260219
CACHE_ENV = "WATCHER_CACHE_DIR"
#: Rows of the embedded data when the data param does not say (the params schema's default too).
EMBEDDED_DEFAULT_ROWS = 6000
#: The values the data param's "task" may take ("auto": inferred from the target).
TASK_CHOICES = ("auto", *TASKS)
_SCHEMA_VERSION = 1


def _frozen_categories(categories: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    return {str(name): tuple(str(c) for c in vocabulary) for name, vocabulary in categories.items()}


@dataclass(frozen=True)
class FeatureSchema:
    """What a model's inputs are: the feature columns in order, the categorical ones' vocabularies (code i
    is ``categories[name][i]``), the task, the class labels (codes 0..C-1) and the target's name. Saved
    with a model (``to_json``) so that new rows are encoded as its training rows were."""

    feature_names: tuple[str, ...]
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    task: str = REGRESSION
    classes: tuple[str, ...] = ()
    target: str = "y"

    def __post_init__(self):
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        object.__setattr__(self, "categories", _frozen_categories(self.categories))
        object.__setattr__(self, "classes", tuple(self.classes))

    def __hash__(self) -> int:  # the vocabularies' dict is not hashable; their items are
        return hash((self.feature_names, tuple(sorted(self.categories.items())), self.task, self.classes,
                     self.target))

    @property
    def categorical_columns(self) -> tuple[int, ...]:
        """Indices of the categorical features, in column order."""
        return tuple(i for i, name in enumerate(self.feature_names) if name in self.categories)

    def to_json(self) -> dict[str, Any]:
        return {"version": _SCHEMA_VERSION, "feature_names": list(self.feature_names),
                "categories": {name: list(self.categories[name]) for name in self.feature_names
                               if name in self.categories},
                "task": self.task, "classes": list(self.classes), "target": self.target}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FeatureSchema:
        """The inverse of to_json; a DataError names what is wrong with a damaged or foreign object."""
        def fail(what: str) -> NoReturn:
            raise DataError(f"feature schema: {what}")
        if not isinstance(obj, Mapping):
            fail(f"expected a JSON object, got {type(obj).__name__}")
        if obj.get("version") != _SCHEMA_VERSION:
            fail(f"version {obj.get('version')!r}: expected {_SCHEMA_VERSION}")
        feature_names = obj.get("feature_names")
        if not isinstance(feature_names, list) or not all(isinstance(n, str) for n in feature_names):
            fail("'feature_names' must be a list of column names")
        categories = obj.get("categories", {})
        if not isinstance(categories, Mapping) or not all(
                isinstance(v, list) and all(isinstance(c, str) for c in v) for v in categories.values()):
            fail("'categories' must map column names to lists of labels")
        unknown = [name for name in categories if name not in feature_names]
        if unknown:
            fail(f"'categories' names {names(unknown)}, not in 'feature_names'")
        task = obj.get("task", REGRESSION)
        if task not in TASKS:
            fail(f"task {task!r}: expected one of {', '.join(TASKS)}")
        classes = obj.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            fail("'classes' must be a list of labels")
        target = obj.get("target", "y")
        if not isinstance(target, str):
            fail("'target' must be a column name")
        return cls(feature_names=tuple(feature_names), categories=categories, task=task, classes=tuple(classes),
                   target=target)


@dataclass(frozen=True)
class Dataset:
    """Features ``X`` [rows, features] and target ``y`` [rows], both float64. Missing features are NaN; a
    categorical feature holds codes 0..k-1 into ``categories[name]`` (NaN where missing). ``y`` holds the
    target's values (regression) or class codes 0..C-1 into ``classes`` (binary, multiclass); it is never
    missing. ``task`` is resolved, never "auto"."""

    name: str
    X: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    task: str = REGRESSION
    classes: tuple[str, ...] = ()
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    target: str = "y"

    def __post_init__(self):
        object.__setattr__(self, "categories", _frozen_categories(self.categories))

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def categorical_columns(self) -> tuple[int, ...]:
        """Indices of the categorical features, in column order."""
        return tuple(i for i, name in enumerate(self.feature_names) if name in self.categories)

    def schema(self) -> FeatureSchema:
        return FeatureSchema(feature_names=self.feature_names, categories=self.categories, task=self.task,
                             classes=self.classes, target=self.target)

    def sha256(self) -> str:
        """A fingerprint of what the models see (names, features, target, vocabularies, classes, task), not of
        the file's bytes: the same values written again (other line endings, "1.0" for "1" in a numeric
        column) are the same data."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.feature_names).encode())
        for array in (self.X, self.y):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        digest.update(json.dumps({"task": self.task, "classes": list(self.classes),
                                  "categories": {k: list(v) for k, v in sorted(self.categories.items())}},
                                 sort_keys=True).encode())
        return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "watcher_plugins")


def _generate_survivors() -> tuple[np.ndarray, np.ndarray]:
    """The full synthetic survivors table: 98,784 x 62, a nonlinear target with interactions and noise."""
    rng = np.random.default_rng(_SURVIVORS_SEED)
    n = FULL_ROWS
    X = np.empty((n, N_FEATURES), dtype=np.float64)
    X[:, :40] = rng.standard_normal((n, 40))
    X[:, 40:52] = rng.uniform(-1.0, 1.0, (n, 12))
    X[:, 52:62] = rng.integers(0, 2, (n, 10))
    # A few informative directions with nonlinearities, so that a small MLP and boosted trees both have
    # something to find and their R^2 differ; the rest is noise features.
    w = rng.standard_normal(10) / math.sqrt(10)
    signal = (
        np.tanh(X[:, :10] @ w) * 1.5
        + 0.8 * np.sin(2.0 * X[:, 10]) * X[:, 11]
        + 0.5 * X[:, 12] ** 2
        + 0.7 * X[:, 40] * (X[:, 52] - 0.5)
        + 0.6 * np.maximum(X[:, 41], 0.0)
        + 0.3 * X[:, 53] * X[:, 13]
    )
    y = signal + 0.6 * rng.standard_normal(n)
    return X.astype(np.float32), y.astype(np.float32)


def embedded_survivors(rows: int = FULL_ROWS) -> Dataset:
    """The first ``rows`` rows of the embedded survivors table, generated once and cached on disk."""
    if not 1 <= rows <= FULL_ROWS:
        raise DataError(f"embedded survivors: rows={rows} is out of range: expected 1..{FULL_ROWS}")
    path = cache_dir() / f"survivors-{_SURVIVORS_SEED}-v1.npz"
    X: np.ndarray | None = None
    y: np.ndarray | None = None
    if path.exists():
        try:
            with np.load(path) as cached:
                X, y = cached["X"], cached["y"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            X = y = None  # a damaged cache is regenerated, never trusted
    if X is None:
        X, y = _generate_survivors()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, X=X, y=y)
            os.replace(tmp, path)  # atomic: concurrent workers never read a half-written cache
        except OSError as exc:
            raise DataError(f"cannot write the embedded dataset's cache {path}: {exc.strerror or exc}; "
                            f"set {CACHE_ENV} to a writable directory") from None
    assert y is not None  # loaded or generated with X
    # Generated and cached in float32; float64 here holds exactly those values, so results do not move.
    return Dataset(name=f"survivors-{rows}", X=X[:rows].astype(np.float64), y=y[:rows].astype(np.float64),
                   feature_names=tuple(f"f{i:02d}" for i in range(N_FEATURES)))


def load_dataset(ref: DataRef) -> Dataset:
    """Load what a DataRef names, checking it all: every problem of a user's file in one DataError, a line
    each. Warnings (DataWarning) for what loads but the user should know: a capped column, dropped rows,
    a mostly numeric column read as categorical."""
    if ref.embedded:
        return embedded_survivors(ref.rows or EMBEDDED_DEFAULT_ROWS)
    path = Path(cast(str, ref.path))  # a DataRef not embedded names its file
    fmt = resolve_format(path, ref.format)
    if fmt != "npz" and not ref.target:
        raise DataError(f"{path}: a {fmt} file needs the data param's 'target': the name of the target column")
    task = ref.task or "auto"
    if task not in TASK_CHOICES:
        raise DataError(f"{path}: the data param's task {task!r} is not one of {', '.join(TASK_CHOICES)}")
    max_categories = MAX_CATEGORIES if ref.max_categories is None else ref.max_categories
    if isinstance(max_categories, bool) or not isinstance(max_categories, int) or max_categories < 2:
        raise DataError(f"{path}: the data param's max_categories {max_categories!r}: expected a whole number, "
                        "at least 2")
    forced = tuple(ref.categorical or ())
    table = read_table(path, fmt, objects=frozenset(forced))
    target = "y" if fmt == "npz" else cast(str, ref.target)  # an npz file's target is its array y
    _check_target_column(table, target)
    feature_names = tuple(name for name in table.columns if name != target)
    if not feature_names:
        raise DataError(f"{path}: no feature columns besides the target")

    problems: dict[str, list[str]] = {name: [] for name in table.columns}  # by column, in file order
    first: list[str] = []
    notes: list[str] = []
    unknown = [name for name in dict.fromkeys(forced) if name not in table.columns]
    if unknown:
        first.append(f"{path}: the data param's categorical names {names(unknown)}, not a column of the file; "
                     f"columns: {names(table.columns)}")
    built = build_target(table, target, target in forced, task, bool(ref.drop_missing_target), problems[target],
                         notes)
    keep = built.keep if built is not None else np.arange(table.n_rows)
    columns: dict[str, Column | None] = {}
    for name in feature_names:
        columns[name] = build_feature(table, name, keep, name in forced, max_categories, problems[name], notes)
    lines = [*first, *(line for name in table.columns for line in problems[name])]
    if lines:
        raise DataError("\n".join(lines))
    assert built is not None
    warn(notes)
    X = np.empty((len(keep), len(feature_names)), dtype=np.float64)
    categories: dict[str, tuple[str, ...]] = {}
    for j, name in enumerate(feature_names):
        column = cast(Column, columns[name])
        X[:, j] = column.values
        if column.categories is not None:
            categories[name] = column.categories
    return Dataset(name=path.name, X=X, y=np.ascontiguousarray(built.y, dtype=np.float64),
                   feature_names=feature_names, task=built.task, classes=built.classes, categories=categories,
                   target=target)


def _check_target_column(table: Table, target: str) -> None:
    if target in table.columns:
        return
    message = f"{table.path}: target column {target!r} not found; columns: {names(table.columns)}"
    # A CSV header "a, t" names its column " t", which is easy to miss even quoted.
    spaced = [name for name in table.columns if name.strip() == target]
    if spaced:
        message += (f"; column {spaced[0]!r} has surrounding spaces: remove them from the file, "
                    f"or name the target {spaced[0]!r}")
    raise DataError(message)


def load_features(path: str | os.PathLike, schema: FeatureSchema | Dataset, fmt: str | None = None) -> np.ndarray:
    """New rows from ``path`` (read as load_dataset reads a file) as the inputs of a model trained with
    ``schema``: X [rows, features] float64, its columns in the schema's order, categories coded with the
    schema's vocabularies. The target column may be absent; other extra columns are ignored. Missing
    feature columns are one DataError naming them all; every other problem (text in a numeric column, a
    non-finite number) one line each of one DataError. A category the model never saw is NaN (or
    "(other)" where its column was capped), with a DataWarning."""
    schema = schema.schema() if isinstance(schema, Dataset) else schema
    path = Path(path)
    resolved = resolve_format(path, fmt)
    categorical = frozenset(schema.categories)
    return _encode(read_table(path, resolved, objects=categorical), schema)


def encode_rows(schema: FeatureSchema | Dataset, table: Mapping[str, Any], *, text: bool = False,
                where: str = "rows") -> np.ndarray:
    """Rows held in memory as columns (name -> a sequence of values, or a numeric array) encoded as
    load_features encodes a file's. Values are typed as in JSON (a string is text, never a number) unless
    ``text``: then every value is a string read as a CSV cell is. ``where`` names them in messages."""
    schema = schema.schema() if isinstance(schema, Dataset) else schema
    columns: dict[str, RawColumn] = {}
    lengths = set()
    for name, values in table.items():
        array = np.asarray(values) if isinstance(values, np.ndarray) else None
        if array is not None and array.ndim == 1 and array.dtype.kind in "iuf" and name not in schema.categories:
            columns[name] = RawColumn(NUMBERS, array.astype(np.float64), integer=array.dtype.kind in "iu")
        else:
            cells = list(values.tolist() if isinstance(values, np.ndarray) else values)
            columns[name] = RawColumn(TEXT if text else VALUES, [str(c) for c in cells] if text else cells)
        lengths.add(len(columns[name]))
    if len(lengths) > 1:
        raise DataError(f"{where}: columns of different lengths ({', '.join(map(str, sorted(lengths)))})")
    return _encode(Table(path=Path(where), fmt="json" if not text else "csv", columns=columns, row_name="row"),
                   schema)


def _encode(table: Table, schema: FeatureSchema) -> np.ndarray:
    missing = [name for name in schema.feature_names if name not in table.columns]
    if missing:
        raise DataError(f"{table.path}: missing column(s) {names(missing)}: the model expects the features "
                        f"{names(schema.feature_names)}")
    problems: list[str] = []
    notes: list[str] = []
    encoded = [encode_feature(table, name, schema.categories.get(name), problems, notes)
               for name in schema.feature_names]
    if problems:
        raise DataError("\n".join(problems))
    warn(notes)
    X = np.empty((table.n_rows, len(schema.feature_names)), dtype=np.float64)
    for j, values in enumerate(encoded):
        X[:, j] = cast(np.ndarray, values)
    return X


def kfold_splits(n_rows: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded k-fold split: a permutation cut into k near-equal held-out parts. (train_idx, val_idx), sorted."""
    if folds < 2:
        raise DataError(f"cannot make {folds} folds: expected at least 2")
    if folds > n_rows // 2:
        raise DataError(f"{n_rows} rows cannot make {folds} folds: R² needs at least 2 held-out rows a fold "
                        f"(at most {n_rows // 2} folds)")
    order = np.random.default_rng(seed).permutation(n_rows)
    parts = np.array_split(order, folds)
    splits = []
    for k in range(folds):
        val = np.sort(parts[k])
        train = np.sort(np.concatenate([parts[j] for j in range(folds) if j != k]))
        splits.append((train, val))
    return splits


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination, in float64."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
