"""Typing and encoding raw columns (readers.py) into float64 model inputs, collecting every problem.

A cell is missing, a number, a boolean, text, or a value none of those (a JSON list). A column is numeric
when every cell that is not missing is a number; booleans alone make a boolean column (categorical, with
the vocabulary ("False", "True")); anything else is categorical, coded 0..k-1 in its sorted vocabulary.
Every function here appends its problems, one line each, to a list instead of raising, so that one
DataError can name them all.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import numpy as np

from watcher_plugins.readers import CATEGORY, NUMBERS, TEXT, UNSUPPORTED, RawColumn, Table
from watcher_plugins.tasks import BINARY, MULTICLASS, REGRESSION

#: CSV cells that mean "missing", compared exactly (case and all) after surrounding spaces are stripped.
#: An empty (or all-space) cell is missing too, in every format; so are null (JSON, parquet) and a NaN
#: float (parquet, npz, and what Python's float() reads as NaN in a CSV, such as "-nan").
NA_MARKERS = ("NA", "N/A", "NaN", "nan", "null", "NULL", "None", "#N/A")
#: A categorical column with more distinct values than this keeps the ``MAX_CATEGORIES - 1`` most
#: frequent ones (ties by label) and maps the rest to one category, OTHER_CATEGORY (the last code).
#: The data param's ``max_categories`` sets another cap.
MAX_CATEGORIES = 256
OTHER_CATEGORY = "(other)"
#: The vocabulary of a boolean column, whatever values it holds.
BOOL_CATEGORIES = ("False", "True")
#: CSV spellings of booleans: a column holding only these (and missing cells) is boolean.
BOOL_WORDS = {"True": "True", "False": "False", "true": "True", "false": "False"}
#: How many rows a message names before "and N more".
SHOWN_ROWS = 5

_NA = frozenset(NA_MARKERS)
MISSING, NUMBER, BOOL, STR, BAD = range(5)  # the kinds of a cell


class DataWarning(UserWarning):
    """Something about the data the user should know, which does not stop the run (a capped column,
    dropped rows, unseen categories at prediction time)."""


@dataclass
class Cells:
    """One column's cells, classified: ``kinds`` (MISSING, NUMBER, ...), ``numbers`` (NaN where not a
    number), ``labels`` (a category label per cell, None where missing), ``values`` (as the file holds
    them, for messages)."""

    kinds: np.ndarray
    numbers: np.ndarray
    labels: Sequence[str | None]
    values: Any

    def count(self, kind: int) -> int:
        return int(np.count_nonzero(self.kinds == kind))

    def rows(self, kind: int) -> np.ndarray:
        return np.flatnonzero(self.kinds == kind)


def number_label(value: float, integer: bool = False) -> str:
    """A number as a category label or class name: integers as "1" (an integral float too, where
    ``integer``), else Python's shortest round-trip repr ("1.5", "1e-07")."""
    if integer and math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def parse_number(text: str) -> float | None:
    """A CSV cell (stripped) as a number, or None. float() also takes "1_000" and non-ASCII digits ("１２３"),
    which are not numbers in a data file."""
    if "_" in text or not text.isascii():
        return None
    try:
        return float(text)
    except ValueError:
        return None


def classify(raw: RawColumn, rows: np.ndarray | None = None) -> Cells:
    """The cells of ``raw`` (of ``rows`` only, where given) classified."""
    if raw.kind == NUMBERS:
        numbers = np.asarray(raw.values, dtype=np.float64)
        if rows is not None:
            numbers = numbers[rows]
        kinds = np.where(np.isnan(numbers), MISSING, NUMBER).astype(np.int8)
        return Cells(kinds, numbers, _LazyLabels(numbers, raw.integer), numbers)
    values = raw.values if rows is None else [raw.values[i] for i in rows]
    if raw.kind == TEXT:
        texts = cast(list[str], values)
        fast = _all_numbers(texts)
        if fast is not None:
            kinds = np.where(np.isnan(fast), MISSING, NUMBER).astype(np.int8)
            return Cells(kinds, fast, _TextLabels(texts, kinds), texts)
    n = len(values)
    kinds = np.empty(n, dtype=np.int8)
    numbers = np.full(n, np.nan)
    labels: list = [None] * n
    text = raw.kind == TEXT
    for i, value in enumerate(values):
        kind, number, label = _classify_text(value) if text else _classify_value(value)
        kinds[i] = kind
        labels[i] = label
        if kind == NUMBER:
            numbers[i] = number
    return Cells(kinds, numbers, labels, values)


class _LazyLabels(Sequence):
    """The labels of a float array's cells, spelled only when asked for (most numeric columns never are)."""

    def __init__(self, numbers: np.ndarray, integer: bool):
        self.numbers, self.integer = numbers, integer

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, i):
        value = float(self.numbers[i])
        return None if math.isnan(value) else number_label(value, self.integer)


def _all_numbers(cells: Sequence[str]) -> np.ndarray | None:
    """The cells as float64 where every one is a number (numpy calls Python's float() on each, in C), else
    None: the cell-by-cell path then sorts them out. "_" and non-ASCII text are left to that path, which
    refuses them as numbers; a NaN spelling is missing either way."""
    joined = "".join(cells)
    if "_" in joined or not joined.isascii():
        return None
    try:
        return np.array(cells, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None


class _TextLabels(Sequence):
    """The labels of CSV cells that are all numbers (stripped, as written), spelled only when asked for."""

    def __init__(self, cells: Sequence[str], kinds: np.ndarray):
        self.cells, self.kinds = cells, kinds

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i):
        return None if self.kinds[i] == MISSING else self.cells[i].strip()


def _classify_text(cell: str) -> tuple[int, float, str | None]:
    s = cell.strip()
    if not s or s in _NA:
        return MISSING, math.nan, None
    if s in BOOL_WORDS:
        return BOOL, math.nan, BOOL_WORDS[s]
    number = parse_number(s)
    if number is None:
        return STR, math.nan, s
    if math.isnan(number):
        return MISSING, math.nan, None
    return NUMBER, number, s  # labelled as written: a categorical "1.0" stays "1.0"


def _classify_value(value) -> tuple[int, float, str | None]:
    if value is None:
        return MISSING, math.nan, None
    if isinstance(value, bool):  # before int: a bool is an int to Python
        return BOOL, math.nan, str(value)
    if isinstance(value, (int, float, Decimal)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf if value > 0 else -math.inf
        if math.isnan(number):
            return MISSING, math.nan, None
        return NUMBER, number, str(value) if isinstance(value, (int, Decimal)) else repr(number)
    if isinstance(value, str):
        s = value.strip()
        return (MISSING, math.nan, None) if not s else (STR, math.nan, s)
    if isinstance(value, (list, dict)):
        return BAD, math.nan, None
    return STR, math.nan, str(value)  # a parquet date or timestamp, read only where listed as categorical


def sort_labels(labels) -> list[str]:
    """Labels sorted: numerically where every one is a number ("2" before "10"), else as strings."""
    labels = list(labels)
    parsed = [parse_number(label) for label in labels]
    if all(p is not None and not math.isnan(p) for p in parsed):
        return [label for _, label in sorted(zip(parsed, labels))]
    return sorted(labels)


def rows_text(row_name: str, rows: Sequence[int], limit: int = SHOWN_ROWS) -> str:
    """``rows`` (numbers counted from 1) as a message names them: "data rows 3, 7, 12, 15, 20 and 4 more"."""
    rows = list(rows)
    if len(rows) == 1:
        return f"{row_name} {rows[0]}"
    if len(rows) <= limit:
        return f"{row_name}s {', '.join(map(str, rows[:-1]))} and {rows[-1]}"
    return f"{row_name}s {', '.join(map(str, rows[:limit]))} and {len(rows) - limit} more"


def _holds(table: Table, cells: Cells, at: np.ndarray, file_rows: np.ndarray, limit: int = 3) -> str:
    """The first cells ``at`` (indices into ``cells``) spelled out: "data row 2 holds 'x', data row 5 holds
    'y'" (and "and N more")."""
    parts = [f"{table.row_name} {int(file_rows[i]) + 1} holds {table.show(cells.values[i])}" for i in at[:limit]]
    more = f" and {len(at) - limit} more" if len(at) > limit else ""
    return ", ".join(parts) + more


@dataclass
class Column:
    """A built feature column: float64 values (numbers, or codes into ``categories`` with NaN missing)."""

    values: np.ndarray
    categories: tuple[str, ...] | None = None  # None: numeric


def _vocabulary(labels: Sequence[str | None], max_categories: int) -> tuple[tuple[str, ...], dict[str, int], int]:
    """The sorted vocabulary of ``labels`` (the cap applied), each label's code, and the distinct count."""
    counts = Counter(label for label in labels if label is not None)
    if len(counts) <= max_categories:
        vocabulary = tuple(sort_labels(counts))
        return vocabulary, {label: i for i, label in enumerate(vocabulary)}, len(counts)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = sort_labels(label for label, _ in ranked[:max_categories - 1] if label != OTHER_CATEGORY)
    vocabulary = (*kept, OTHER_CATEGORY)
    codes = {label: i for i, label in enumerate(kept)}
    other = len(kept)
    return vocabulary, {label: codes.get(label, other) for label in counts}, len(counts)


def _codes(labels: Sequence[str | None], codes: Mapping[str, float], default: float = math.nan) -> np.ndarray:
    return np.array([math.nan if label is None else codes.get(label, default) for label in labels],
                    dtype=np.float64)


def _non_finite(table: Table, label: str, cells: Cells, file_rows: np.ndarray,
                hint: str = " (an empty cell for a missing value)") -> str | None:
    bad = np.flatnonzero((cells.kinds == NUMBER) & ~np.isfinite(cells.numbers))
    if not len(bad):
        return None
    shown = ", ".join(sorted({repr(float(cells.numbers[i])) for i in bad[:SHOWN_ROWS]}))
    return (f"{table.path}: {label} has a non-finite value ({shown}) at "
            f"{rows_text(table.row_name, [int(file_rows[i]) + 1 for i in bad])}: expected finite numbers{hint}")


def _bad_values(table: Table, label: str, cells: Cells, file_rows: np.ndarray) -> str | None:
    bad = cells.rows(BAD)
    if not len(bad):
        return None
    return (f"{table.path}: {label} holds values that are no number, text or boolean: "
            f"{_holds(table, cells, bad, file_rows)}: expected a number, text, a boolean or null in each cell")


def _unsupported(table: Table, label: str, raw: RawColumn) -> str:
    return (f"{table.path}: {label} has the type {raw.type_name}: expected numbers, text, booleans or "
            "categories; list the column in the data param's 'categorical' to read its values as categories")


def _no_values(table: Table, label: str) -> str:
    return f"{table.path}: {label} has no values: every cell is missing: expected at least one value (or drop the column)"


def build_feature(table: Table, name: str, keep: np.ndarray, forced: bool, max_categories: int,
                  problems: list[str], notes: list[str]) -> Column | None:
    """The feature column ``name`` on the rows ``keep`` (indices into the file's rows); None where it has
    a problem (appended to ``problems``). ``notes``: warnings to give once the whole file loads."""
    raw = table.columns[name]
    label = f"column {name!r}"
    if raw.kind == UNSUPPORTED and not forced:
        problems.append(_unsupported(table, label, raw))
        return None
    cells = classify(raw, keep)
    bad = _bad_values(table, label, cells, keep)
    if bad:
        problems.append(bad)
        return None
    present = cells.kinds != MISSING
    n_present = int(np.count_nonzero(present))
    if n_present == 0:
        problems.append(_no_values(table, label))
        return None
    n_numbers = cells.count(NUMBER)
    if cells.count(BOOL) == n_present:
        return Column(_codes(cells.labels, {c: i for i, c in enumerate(BOOL_CATEGORIES)}), BOOL_CATEGORIES)
    if n_numbers == n_present and not forced and raw.kind != CATEGORY:
        problem = _non_finite(table, label, cells, keep)
        if problem:
            problems.append(problem)
            return None
        return Column(np.ascontiguousarray(cells.numbers))
    if not forced and raw.kind != CATEGORY and n_numbers * 2 > n_present:
        text = np.flatnonzero(present & (cells.kinds != NUMBER))
        notes.append(f"{table.path}: {label} is read as categorical: {len(text)} of its {n_present} values are "
                     f"not numbers ({_holds(table, cells, text, keep)}); if the column is numeric, fix those "
                     f"cells or mark them missing (an empty cell, or one of {', '.join(NA_MARKERS)})")
    labels = list(cells.labels)
    vocabulary, codes, distinct = _vocabulary(labels, max_categories)
    if distinct > max_categories:
        notes.append(f"{table.path}: {label} has {distinct} distinct values, more than the cap of {max_categories}: "
                     f"the {max_categories - 1} most frequent are kept and the rest read as one category "
                     f"{OTHER_CATEGORY!r}; set the data param's max_categories to raise the cap")
    return Column(_codes(labels, codes), vocabulary)


@dataclass
class Target:
    y: np.ndarray  # float64 on the kept rows: values (regression) or class codes
    task: str
    classes: tuple[str, ...]
    keep: np.ndarray  # the file's rows kept (indices)


def build_target(table: Table, name: str, forced: bool, task: str, drop_missing: bool,
                 problems: list[str], notes: list[str]) -> Target | None:
    """The target column: its missing rows (refused, or dropped with ``drop_missing``), its task (``task``,
    or inferred where "auto") and values or class codes. None where it has a problem."""
    raw = table.columns[name]
    label = f"target column {name!r}"
    if raw.kind == UNSUPPORTED and not forced:
        problems.append(_unsupported(table, label, raw))
        return None
    cells = classify(raw)
    all_rows = np.arange(len(cells.kinds))
    bad = _bad_values(table, label, cells, all_rows)
    if bad:
        problems.append(bad)
        return None
    missing = cells.rows(MISSING)
    if len(missing) == len(all_rows):
        problems.append(_no_values(table, label))
        return None
    where = rows_text(table.row_name, [int(i) + 1 for i in missing]) if len(missing) else ""
    if len(missing) and not drop_missing:
        problems.append(f"{table.path}: {label} is missing at {where}: expected a value in every row; to drop "
                        "the rows without one, set the data param's drop_missing_target: true")
        return None
    keep = np.flatnonzero(cells.kinds != MISSING)
    if len(missing):
        notes.append(f"{table.path}: {len(missing)} row(s) without a target value dropped ({where}), "
                     "as drop_missing_target asks")
    if len(keep) < 2:
        problems.append(f"{table.path}: {len(keep)} row(s)" + (" with a target value" if len(missing) else "")
                        + ": expected at least 2")
        return None
    kinds = cells.kinds[keep]
    numeric = bool((kinds == NUMBER).all()) and not forced and raw.kind != CATEGORY
    if not numeric and task == REGRESSION:
        if forced or raw.kind == CATEGORY:
            why = "is categorical" + (" (listed in the data param's 'categorical')" if forced else "")
        else:
            first = keep[np.flatnonzero(kinds != NUMBER)[:1]]
            why = f"is not numeric: {_holds(table, cells, first, all_rows)}"
        problems.append(f"{table.path}: {label} {why}: the task regression expects numbers; set the data "
                        "param's task to binary or multiclass (or auto) for classes")
        return None
    if numeric:
        numbers = cells.numbers[keep]
        problem = _non_finite(table, label, Cells(kinds, numbers, [], []), keep, hint="")
        if problem:
            problems.append(problem)
            return None
        distinct = np.unique(numbers)
        if len(distinct) == 1:
            problems.append(_constant(table, label, task, f"{float(distinct[0]):g}"))
            return None
        if task == "auto":
            task = BINARY if len(distinct) == 2 else REGRESSION
        if task == REGRESSION:
            return Target(np.ascontiguousarray(numbers), task, (), keep)
        if not _class_count_fits(table, label, task, len(distinct), problems):
            return None
        classes = tuple(number_label(float(v), integer=True) for v in distinct)  # 0/1 (or 0.0/1.0): "0", "1"
        return Target(np.searchsorted(distinct, numbers).astype(np.float64), task, classes, keep)
    labels = [cells.labels[i] for i in keep]
    vocabulary = tuple(sort_labels(set(labels)))
    if len(vocabulary) == 1:
        problems.append(_constant(table, label, task, repr(vocabulary[0])))
        return None
    if task == "auto":
        task = BINARY if len(vocabulary) == 2 else MULTICLASS
    if not _class_count_fits(table, label, task, len(vocabulary), problems):
        return None
    codes = {c: i for i, c in enumerate(vocabulary)}
    return Target(_codes(labels, codes), task, vocabulary, keep)


def _constant(table: Table, label: str, task: str, value: str) -> str:
    if task in ("auto", REGRESSION):
        # Every model would score R² = 0.0 on a constant target, which looks like a result; R² is undefined.
        return (f"{table.path}: {label} is constant: R² is undefined; expected at least two different values, "
                f"found only {value}")
    return f"{table.path}: {label} is constant: the task {task} expects at least two classes, found only {value}"


def _class_count_fits(table: Table, label: str, task: str, count: int, problems: list[str]) -> bool:
    if task == BINARY and count != 2:
        problems.append(f"{table.path}: {label} has {count} classes: the task binary expects exactly 2; "
                        "set the data param's task to multiclass (or auto)")
        return False
    if task == MULTICLASS and count < 3:
        problems.append(f"{table.path}: {label} has {count} classes: the task multiclass expects at least 3; "
                        "set the data param's task to binary (or auto)")
        return False
    return True


def encode_feature(table: Table, name: str, categories: tuple[str, ...] | None, problems: list[str],
                   notes: list[str]) -> np.ndarray | None:
    """Column ``name`` of new rows encoded as a model trained with ``categories`` (None: numeric) expects:
    a category not in the vocabulary is NaN (OTHER_CATEGORY's code where the vocabulary was capped), with
    a note; text in a numeric column is a problem."""
    raw = table.columns[name]
    label = f"column {name!r}"
    cells = classify(raw)
    all_rows = np.arange(len(cells.kinds))
    bad = _bad_values(table, label, cells, all_rows)
    if bad:
        problems.append(bad)
        return None
    if categories is None:
        if raw.kind == UNSUPPORTED:
            problems.append(f"{table.path}: {label} has the type {raw.type_name}: the model expects numbers")
            return None
        text = np.flatnonzero((cells.kinds != NUMBER) & (cells.kinds != MISSING))
        if len(text):
            problems.append(f"{table.path}: {label} is not numeric: {_holds(table, cells, text, all_rows)}: "
                            "the model expects numbers in it (an empty cell for a missing value)")
            return None
        problem = _non_finite(table, label, cells, all_rows)
        if problem:
            problems.append(problem)
            return None
        return np.ascontiguousarray(cells.numbers)
    codes = {category: i for i, category in enumerate(categories)}
    capped = len(categories) > 0 and categories[-1] == OTHER_CATEGORY
    out = np.full(len(cells.kinds), np.nan)
    unseen: Counter[str] = Counter()
    for i, kind in enumerate(cells.kinds):
        if kind == MISSING:
            continue
        code = None
        for spelling in _spellings(cells, i):
            code = codes.get(spelling)
            if code is not None:
                break
        if code is None:
            unseen[str(cells.labels[i])] += 1
            if capped:
                code = len(categories) - 1
        if code is not None:
            out[i] = code
    if unseen:
        shown = ", ".join(repr(label) for label, _ in unseen.most_common(SHOWN_ROWS))
        more = f" and {len(unseen) - SHOWN_ROWS} more" if len(unseen) > SHOWN_ROWS else ""
        to = f"the category {OTHER_CATEGORY!r}" if capped else "missing (NaN)"
        notes.append(f"{table.path}: {label} has {sum(unseen.values())} value(s) not in the training data's "
                     f"vocabulary ({shown}{more}): read as {to}")
    return out


def _spellings(cells: Cells, i: int):
    """A cell's label, then (for a number) its other spellings: "1" for 1.0 and "1.0" for 1, so that a
    model trained on a CSV's "1" knows a parquet file's 1.0."""
    yield cells.labels[i]
    if cells.kinds[i] == NUMBER:
        value = float(cells.numbers[i])
        yield number_label(value, integer=True)
        yield repr(value)


def warn(notes: Sequence[str]) -> None:
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=3)
