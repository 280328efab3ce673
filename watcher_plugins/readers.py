"""Readers of users' data files: each turns a file into raw columns, whose cells are typed later (columns.py).

A reader refuses only what keeps the file from being read at all (a missing file, CSV lines of the wrong
length, duplicate column names, JSON records with other fields): one DataError, at once. Everything about
the values themselves (text in a numeric column, inf, missing targets) is found afterwards, column by
column, and reported all at once.

Only numpy here (pyarrow lazily, for .parquet), so that any worker process imports it cheaply.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from watcher_plugins.errors import DataError

_FORMATS = {".npz": "npz", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json"}
#: The values the data param's "format" may take.
DATA_FORMATS = tuple(dict.fromkeys(_FORMATS.values()))
#: What messages call a row, where a format has its own word for it (JSON's records).
_ROW_NAMES = {"json": "record"}

# What a raw column's cells are:
TEXT = "text"  # CSV cells, every one a string: "1.5" is a number, "" and the NA markers are missing
VALUES = "values"  # typed values (JSON, parquet): numbers, str, bool, None; a string is never a number
NUMBERS = "numbers"  # a float64 array (npz, a parquet numeric column): NaN is missing
CATEGORY = "category"  # typed values of a column the file itself declares categorical (parquet dictionary)
UNSUPPORTED = "unsupported"  # typed values of a type that is none of the above (parquet timestamps, lists)


@dataclass
class RawColumn:
    """One column as read: ``values`` a list (TEXT, VALUES, CATEGORY, UNSUPPORTED) or a float64 array
    (NUMBERS). ``integer``: a NUMBERS column stored as integers (its values spell as "1", not "1.0").
    ``type_name``: the file's own name of an UNSUPPORTED column's type."""

    kind: str
    values: list | np.ndarray
    integer: bool = False
    type_name: str = ""

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Table:
    """A file's columns in file order, what its messages call a row, and how they spell a value."""

    path: Path
    fmt: str
    columns: dict[str, RawColumn]
    row_name: str = "data row"

    @property
    def n_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def show(self, value) -> str:
        """A cell's value as the file spells it: JSON as JSON (true, null, "1.5"), else Python's repr."""
        if self.fmt == "json":
            try:
                return json.dumps(value)
            except (TypeError, ValueError):
                return repr(value)
        return repr(value)


def resolve_format(path: Path, fmt: str | None) -> str:
    """The file's format, from the data param's "format" or the file's suffix; checks that it is a file."""
    if path.is_dir():  # before the suffix check: a directory's name says nothing about a format
        raise DataError(f"{path}: is a directory: expected a data file")
    fmt = fmt or _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}: expected one of {', '.join(sorted(_FORMATS))}"
                        " or a 'format' in the data param")
    if fmt not in DATA_FORMATS:
        raise DataError(f"{path}: the data param's format {fmt!r} is not one of {', '.join(DATA_FORMATS)}")
    if not path.is_file():
        raise DataError(_not_a_file(path))
    return fmt


def read_table(path: Path, fmt: str, objects: frozenset[str] = frozenset()) -> Table:
    """Read ``path`` (of ``fmt``, resolved) into raw columns. ``objects``: parquet columns to read as their
    values (VALUES) even where they are numeric, because they are read as categories."""
    try:
        if fmt == "npz":
            columns = _read_npz(path)
        elif fmt == "csv":
            columns = _read_csv(path)
        elif fmt == "parquet":
            columns = _read_parquet(path, objects)
        else:
            columns = _read_json_records(path)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the {fmt} file: {exc}") from None
    return Table(path=path, fmt=fmt, columns=columns, row_name=_ROW_NAMES.get(fmt, "data row"))


def _not_a_file(path: Path) -> str:
    if path.exists():  # a FIFO, a socket, a device
        return f"{path}: not a regular file: expected a data file"
    if path.is_absolute():
        return f"{path}: data file not found"
    # A relative path depends on where the run was started; say where that was.
    return f"{path}: data file not found (a relative path, resolved against the current directory {Path.cwd()})"


def names(names) -> str:
    """Column names quoted, so that a name's surrounding spaces (a CSV header's "a, t") show in a message."""
    return ", ".join(map(repr, names))


def _check_unique_names(path: Path, column_names: list[str], where: str) -> None:
    counts = Counter(column_names)  # linear: files with 100,000 columns exist
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise DataError(f"{path}: column name(s) {names(duplicates)} appear more than once in {where}")


def _read_npz(path: Path) -> dict[str, RawColumn]:
    """Arrays X (rows x features) and y (rows): columns x0, x1, ... and y."""
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in ("X", "y") if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array {', '.join(missing)}: expected arrays 'X' (rows x features) "
                            f"and 'y' (rows); found {names(archive.files) or 'none'}")
        X, y = archive["X"], archive["y"]
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise DataError(f"{path}: expected X of shape (rows, features) and y of shape (rows,), "
                        f"got X {X.shape} and y {y.shape}")
    for name, arr in (("X", X), ("y", y)):
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise DataError(f"{path}: array {name} has dtype {arr.dtype}: expected real numbers")
    x_integer = bool(np.issubdtype(X.dtype, np.integer))
    X64 = X.astype(np.float64)
    columns = {f"x{i}": RawColumn(NUMBERS, np.ascontiguousarray(X64[:, i]), x_integer) for i in range(X.shape[1])}
    columns["y"] = RawColumn(NUMBERS, y.astype(np.float64), bool(np.issubdtype(y.dtype, np.integer)))
    return columns


def _read_csv(path: Path) -> dict[str, RawColumn]:
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
    cells = list(zip(*rows))  # column-major, one tuple a column
    return {name: RawColumn(TEXT, list(cells[j])) for j, name in enumerate(header)}


def _csv_rows(path: Path, reader) -> tuple[list[str], list[list[str]]]:
    # Blank lines (a trailing one is common) carry no data; skip them wherever they are. A line of
    # separators only (",,") is a row whose every cell is missing: kept, so that predict's rows line up.
    lines = (row for row in reader if len(row) > 1 or any(field.strip() for field in row))
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


def _read_parquet(path: Path, objects: frozenset[str]) -> dict[str, RawColumn]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'watcher_plugins[parquet]'") from None
    # Checked on the schema first: pyarrow's own error for duplicate names is a multi-line schema dump.
    schema = pq.read_schema(path)
    _check_unique_names(path, schema.names, "the parquet schema")
    categorical = _pandas_categoricals(schema)
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows in the parquet file")
    columns: dict[str, RawColumn] = {}
    for name in table.column_names:
        column = table.column(name)
        kind = column.type
        if pa.types.is_dictionary(kind) or name in categorical:  # pandas' category dtype, written by to_parquet
            columns[name] = RawColumn(CATEGORY, column.to_pylist())
        elif pa.types.is_null(kind):  # every cell null
            columns[name] = RawColumn(VALUES, [None] * len(column))
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            if name in objects:
                columns[name] = RawColumn(VALUES, column.to_pylist())
            else:
                as_float = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)  # nulls: NaN
                columns[name] = RawColumn(NUMBERS, np.asarray(as_float, dtype=np.float64),
                                          integer=pa.types.is_integer(kind))
        elif pa.types.is_boolean(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind) or \
                (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind)):
            columns[name] = RawColumn(VALUES, column.to_pylist())
        else:
            columns[name] = RawColumn(UNSUPPORTED, column.to_pylist(), type_name=str(kind))
    return columns


def _pandas_categoricals(schema) -> frozenset[str]:
    """The columns pandas wrote from its category dtype. A string category column reads back as a dictionary
    column; one of numbers reads back as plain numbers, and only pandas' metadata says what it was."""
    try:
        metadata = schema.pandas_metadata or {}
        return frozenset(str(c.get("name")) for c in metadata.get("columns", [])
                         if isinstance(c, dict) and c.get("pandas_type") == "categorical")
    except (ValueError, TypeError, AttributeError):  # metadata that is not pandas': nothing declared
        return frozenset()


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


def _read_json_records(path: Path) -> dict[str, RawColumn]:
    """A list of flat records (or {"survivors": [...]}), each with the same fields."""
    doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_json_object)
    if isinstance(doc, _RepeatedKeyObject):
        raise DataError(f"{path}: the key {doc.key!r} appears more than once")
    records = doc.get("survivors") if isinstance(doc, dict) else doc
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a non-empty JSON list of records (objects), or {{\"survivors\": [...]}}")
    fields = list(records[0])
    for i, record in enumerate(records, start=1):  # counted from 1, as every message about data rows does
        if isinstance(record, _RepeatedKeyObject):
            raise DataError(f"{path}: record {i} has the key {record.key!r} more than once: "
                            "expected unique column names")
        if list(record) != fields and set(record) != set(fields):
            raise DataError(f"{path}: record {i} has fields {sorted(record)}: expected {sorted(fields)} as record 1")
    return {name: RawColumn(VALUES, [r[name] for r in records]) for name in fields}
