"""Datasets: the embedded synthetic survivors data, loaders for users' files, and seeded k-fold splits.

Only numpy here (pandas/pyarrow lazily, for .parquet), so that any worker process can import it
without pulling in a CUDA framework.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from watcher_plugins.errors import DataError
from watcher_plugins.records import DataRef

N_FEATURES = 62
FULL_ROWS = 98_784  # the seed's survivors count
_SURVIVORS_SEED = 20260219
CACHE_ENV = "WATCHER_CACHE_DIR"
_FORMATS = {".npz": "npz", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json"}
#: Rows of the embedded data when the data param does not say (the params schema's default too).
EMBEDDED_DEFAULT_ROWS = 6000
#: The values the data param's "format" may take.
DATA_FORMATS = tuple(dict.fromkeys(_FORMATS.values()))
#: What messages call a row, where a format has its own word for it (JSON's records).
_ROW_NAMES = {"json": "record"}


@dataclass(frozen=True)
class Dataset:
    """Features X (rows x features, float32) and target y (rows, float32), all finite."""

    name: str
    X: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    def sha256(self) -> str:
        """A fingerprint of what the models see (names, features, target), not of the file's bytes: the
        same numbers written again (other line endings, "1.0" for "1") are the same data."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.feature_names).encode())
        for array in (self.X, self.y):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
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
    names = tuple(f"f{i:02d}" for i in range(N_FEATURES))
    return Dataset(name=f"survivors-{rows}", X=np.ascontiguousarray(X[:rows]), y=np.ascontiguousarray(y[:rows]),
                   feature_names=names)


def load_dataset(ref: DataRef) -> Dataset:
    """Load what a DataRef names, checking it: numeric, finite, with its target column."""
    if ref.embedded:
        return embedded_survivors(ref.rows or EMBEDDED_DEFAULT_ROWS)
    path = Path(cast(str, ref.path))  # a DataRef not embedded names its file
    if path.is_dir():  # before the suffix check: a directory's name says nothing about a format
        raise DataError(f"{path}: is a directory: expected a data file")
    fmt = ref.format or _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}: expected one of {', '.join(sorted(_FORMATS))}"
                        " or a 'format' in the data param")
    if fmt not in DATA_FORMATS:
        raise DataError(f"{path}: the data param's format {fmt!r} is not one of {', '.join(DATA_FORMATS)}")
    if not path.is_file():
        raise DataError(_not_a_file(path))
    if fmt != "npz" and not ref.target:
        raise DataError(f"{path}: a {fmt} file needs the data param's 'target': the name of the target column")
    target = cast(str, ref.target)  # checked above for every format but npz, which needs none
    try:
        if fmt == "npz":
            columns, y = _read_npz(path)
        elif fmt == "csv":
            columns, y = _split_target(path, _read_csv(path), target)
        elif fmt == "parquet":
            columns, y = _split_target(path, _read_parquet(path), target)
        else:
            columns, y = _split_target(path, _read_json_records(path), target)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the {fmt} file: {exc}") from None
    names = tuple(columns)
    if not names:
        raise DataError(f"{path}: no feature columns besides the target")
    target = ref.target or "y"
    row = _ROW_NAMES.get(fmt, "data row")
    X = np.column_stack([_to_float32(path, columns[name], f"column {name!r}", row) for name in names])
    y = _to_float32(path, y, f"target column {target!r}", row)
    _check_finite(path, X, y, names, target, row)
    return Dataset(name=path.name, X=np.ascontiguousarray(X), y=np.ascontiguousarray(y), feature_names=names)


def _not_a_file(path: Path) -> str:
    if path.exists():  # a FIFO, a socket, a device
        return f"{path}: not a regular file: expected a data file"
    if path.is_absolute():
        return f"{path}: data file not found"
    # A relative path depends on where the run was started; say where that was.
    return f"{path}: data file not found (a relative path, resolved against the current directory {Path.cwd()})"


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in ("X", "y") if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array {', '.join(missing)}: expected arrays 'X' (rows x features) "
                            f"and 'y' (rows); found {_names(archive.files) or 'none'}")
        X, y = archive["X"], archive["y"]
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise DataError(f"{path}: expected X of shape (rows, features) and y of shape (rows,), "
                        f"got X {X.shape} and y {y.shape}")
    for name, arr in (("X", X), ("y", y)):
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise DataError(f"{path}: array {name} has dtype {arr.dtype}: expected real numbers")
    return {f"x{i}": X[:, i] for i in range(X.shape[1])}, y


def _numeric_column(path: Path, name: str, values: list, row_name: str = "data row", show=repr,
                    text: bool = False) -> np.ndarray:
    """``values`` as float64. ``text``: the format spells every value as a string (CSV), so a string may be a
    number; in a typed format (JSON, parquet) it is not. Messages count rows from 1, call them ``row_name``
    and spell a value that is not a number with ``show``, as the file spells it."""
    out = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values):
        try:
            # float() also takes "1_000" and non-ASCII digits ("１２３"), which are not numbers in a data file,
            # and booleans (a bool is an int to Python), which a CSV's "True" is not either.
            if isinstance(value, bool) or (isinstance(value, str) and (
                    not text or "_" in value or not value.isascii())):
                raise ValueError(value)
            out[row] = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}: column {name!r} is not numeric: {row_name} {row + 1} holds {show(value)}") \
                from None
    return out


def _check_unique_names(path: Path, names: list[str], where: str) -> None:
    counts = Counter(names)  # linear: files with 100,000 columns exist
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise DataError(f"{path}: column name(s) {_names(duplicates)} appear more than once in {where}")


def _names(names) -> str:
    """Column names quoted, so that a name's surrounding spaces (a CSV header's "a, t") show in a message."""
    return ", ".join(map(repr, names))


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise become part of
    # the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header, rows = _csv_rows(path, reader)
        except csv.Error as exc:
            # The csv module's own errors (a field over its size limit, ...) name no file or line.
            if "field limit" in str(exc):
                raise DataError(f"{path}: line {reader.line_num} has a field longer than "
                                f"{csv.field_size_limit()} characters: expected column names and numbers") from None
            raise DataError(f"{path}: line {reader.line_num} is not valid CSV: {exc}") from None
    if not rows:
        raise DataError(f"{path}: no data rows below the header")
    return {name: _numeric_column(path, name, [row[j] for row in rows], text=True) for j, name in enumerate(header)}


def _csv_rows(path: Path, reader) -> tuple[list[str], list[list[str]]]:
    # Blank lines (a trailing one is common) carry no data; skip them wherever they are.
    lines = (row for row in reader if any(field.strip() for field in row))
    header = next(lines, None)
    if not header:
        raise DataError(f"{path}: empty CSV file: expected a header row and data rows")
    for j, name in enumerate(header):
        if not name.strip():
            raise DataError(f"{path}: column {j + 1} has no name in the header")
    _check_unique_names(path, header, "the header")
    rows = []
    for row in lines:
        if len(row) != len(header):  # reader.line_num: the file's line, counting skipped blank lines
            raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields: "
                            f"expected {len(header)} as in the header")
        rows.append(row)
    return header, rows


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'watcher_plugins[parquet]'") from None
    # Checked on the schema first: pyarrow's own error for duplicate names is a multi-line schema dump.
    _check_unique_names(path, pq.read_schema(path).names, "the parquet schema")
    table = pq.read_table(path)
    return {name: _numeric_column(path, name, table.column(name).to_pylist()) for name in table.column_names}


class _RepeatedKeyObject(dict):
    """A JSON object that names ``key`` more than once; it holds the last value, as json.loads keeps it."""

    def __init__(self, pairs: list[tuple[str, object]], key: str):
        super().__init__(pairs)
        self.key = key


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: marks an object with a repeated key, whose other values json.loads would drop
    unseen. The reader refuses it where it can say which record it is."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _RepeatedKeyObject(pairs, key)
        seen.add(key)
    return dict(pairs)


def _read_json_records(path: Path) -> dict[str, np.ndarray]:
    """Survivors JSON: a list of flat records (or {"survivors": [...]}), each with the same numeric fields."""
    doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_json_object)
    if isinstance(doc, _RepeatedKeyObject):
        raise DataError(f"{path}: the key {doc.key!r} appears more than once")
    records = doc.get("survivors") if isinstance(doc, dict) else doc
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a non-empty JSON list of records (objects), or {{\"survivors\": [...]}}")
    names = list(records[0])
    for i, record in enumerate(records, start=1):  # counted from 1, as every message about data rows does
        if isinstance(record, _RepeatedKeyObject):
            raise DataError(f"{path}: record {i} has the key {record.key!r} more than once: "
                            "expected unique column names")
        if list(record) != names and set(record) != set(names):
            raise DataError(f"{path}: record {i} has fields {sorted(record)}: expected {sorted(names)} as record 1")
    return {name: _numeric_column(path, name, [r[name] for r in records], _ROW_NAMES["json"], json.dumps)
            for name in names}


def _split_target(path: Path, columns: dict[str, np.ndarray], target: str) -> tuple[dict, np.ndarray]:
    if target not in columns:
        message = f"{path}: target column {target!r} not found; columns: {_names(columns)}"
        # A CSV header "a, t" names its column " t", which is easy to miss even quoted.
        spaced = [name for name in columns if name.strip() == target]
        if spaced:
            message += (f"; column {spaced[0]!r} has surrounding spaces: remove them from the file, "
                        f"or name the target {spaced[0]!r}")
        raise DataError(message)
    return columns, columns.pop(target)


def _to_float32(path: Path, values: np.ndarray, label: str, row_name: str = "data row") -> np.ndarray:
    """Cast to float32, refusing finite values that the cast would turn into inf (beyond about ±3.4e38)."""
    with np.errstate(over="ignore"):  # reported below as a DataError, instead of numpy's RuntimeWarning
        out = np.asarray(values).astype(np.float32)
    overflow = np.isinf(out) & np.isfinite(values)
    if overflow.any():
        row = int(np.flatnonzero(overflow)[0])
        raise DataError(f"{path}: {label} has a value too large for float32 ({float(values[row]):g}) at {row_name} "
                        f"{row + 1}: expected a value within float32's range (about ±3.4e38)")
    return out


def _check_finite(path: Path, X: np.ndarray, y: np.ndarray, names: tuple[str, ...], target: str,
                  row_name: str = "data row") -> None:
    """At least 2 rows, all finite, and a target that varies. Rows are counted from 1 (no CSV header)."""
    if X.shape[0] < 2:
        raise DataError(f"{path}: {X.shape[0]} rows: expected at least 2")
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DataError(f"{path}: target column {target!r} has a non-finite value (NaN or inf) at {row_name} {row + 1}")
    bad = ~np.isfinite(X)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"{path}: column {names[col]!r} has a non-finite value (NaN or inf) at {row_name} {row + 1}")
    # Checked on the float32 values the models see. Every model would score R² = 0.0 on a constant target,
    # which looks like a result; R² is undefined there.
    if (y == y[0]).all():
        raise DataError(f"{path}: target column {target!r} is constant: R² is undefined; expected at least two "
                        f"different values, found only {float(y[0]):g}")


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
