"""Users' tables (#20): missing values, categorical columns, the task from the target, and every problem of a
file in one DataError. The files are made here: CSV, parquet (pyarrow is in the test extra), JSON and npz."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from watcher_plugins.data import (
    MAX_CATEGORIES,
    NA_MARKERS,
    OTHER_CATEGORY,
    DataWarning,
    load_dataset,
)
from watcher_plugins.errors import DataError
from watcher_plugins.records import DataRef


def _csv(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _load(path, **options):
    return load_dataset(DataRef(path=str(path), target=options.pop("target", "y"), **options))


def _quiet_load(path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # nothing to warn about in these files
        return _load(path, **options)


def _problems(path, **options) -> list[str]:
    with pytest.raises(DataError) as excinfo:
        _load(path, **options)
    return str(excinfo.value).split("\n")


# --- missing values ---------------------------------------------------------------------------------------

def test_the_documented_na_markers():
    assert NA_MARKERS == ("NA", "N/A", "NaN", "nan", "null", "NULL", "None", "#N/A")
    assert MAX_CATEGORIES == 256 and OTHER_CATEGORY == "(other)"


@pytest.mark.parametrize("cell", ["", "   ", *NA_MARKERS, " NA ", "-nan"])
def test_empty_cells_and_each_na_marker_are_missing_in_a_numeric_column(tmp_path, cell):
    path = _csv(tmp_path, f"a,b,y\n1,{cell},1.5\n2,3,2.5\n3,4,3.5\n")
    dataset = _quiet_load(path)
    assert dataset.categories == {}  # still numeric: a missing cell is no text
    np.testing.assert_array_equal(dataset.X, [[1.0, np.nan], [2.0, 3.0], [3.0, 4.0]])


@pytest.mark.parametrize("cell", ["", *NA_MARKERS])
def test_na_markers_are_missing_in_a_text_column_not_a_category(tmp_path, cell):
    path = _csv(tmp_path, f"colour,y\nred,1.5\n{cell},2.5\nblue,3.5\n")
    dataset = _quiet_load(path)
    assert dataset.categories == {"colour": ("blue", "red")}
    np.testing.assert_array_equal(dataset.X[:, 0], [1.0, np.nan, 0.0])


@pytest.mark.parametrize("cell", ["na", "n/a", "NONE", "-"])
def test_other_spellings_are_not_markers(tmp_path, cell):
    # The markers are compared exactly: "na" is text, which makes the column categorical (with a warning).
    path = _csv(tmp_path, f"a,y\n1,1.5\n{cell},2.5\n3,3.5\n")
    with pytest.warns(DataWarning, match=rf"column 'a' is read as categorical: 1 of its 3 values are not numbers "
                                         rf"\(data row 2 holds '{cell}'\)"):
        dataset = _load(path)
    assert cell in dataset.categories["a"]


def test_parquet_nulls_and_nans_are_missing(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({
        "f": pa.array([1.5, None, float("nan"), 4.0], pa.float64()),
        "i": pa.array([1, None, 3, 4], pa.int64()),
        "s": pa.array(["x", None, "y", ""], pa.string()),
        "b": pa.array([True, None, False, True]),
        "y": [1.0, 2.0, 3.0, 4.0],
    }), path)
    dataset = _quiet_load(path)
    np.testing.assert_array_equal(dataset.X, [[1.5, 1.0, 0.0, 1.0], [np.nan, np.nan, np.nan, np.nan],
                                              [np.nan, 3.0, 1.0, 0.0], [4.0, 4.0, np.nan, 1.0]])
    assert dataset.categories == {"s": ("x", "y"), "b": ("False", "True")} and dataset.categorical_columns == (2, 3)


def test_json_nulls_are_missing(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1, "c": "x", "y": 1.5}, {"a": None, "c": None, "y": 2.5},
                                {"a": 3, "c": "z", "y": 3.5}]))
    dataset = _quiet_load(path)
    np.testing.assert_array_equal(dataset.X, [[1.0, 0.0], [np.nan, np.nan], [3.0, 1.0]])


def test_npz_nans_are_missing(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.array([[1.0, np.nan], [2.0, 3.0], [4.0, 5.0]]), y=np.array([0.5, 1.5, 2.5]))
    dataset = load_dataset(DataRef(path=str(path)))
    np.testing.assert_array_equal(dataset.X, [[1.0, np.nan], [2.0, 3.0], [4.0, 5.0]])
    np.savez(path, X=np.ones((3, 1)), y=np.array([0.5, np.nan, 2.5]))
    with pytest.raises(DataError, match=r"target column 'y' is missing at data row 2: "):
        load_dataset(DataRef(path=str(path)))


def test_a_column_without_any_value_is_a_problem(tmp_path):
    path = _csv(tmp_path, "a,b,y\n1,,1.5\n2,NA,2.5\n3, ,3.5\n")
    assert _problems(path) == [f"{path}: column 'b' has no values: every cell is missing: expected at least one "
                               "value (or drop the column)"]
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0], "n": pa.array([None, None], pa.null()), "y": [1.0, 2.0]}), pq_path)
    assert _problems(pq_path, task="regression") == [
        f"{pq_path}: column 'n' has no values: every cell is missing: expected at least one value (or drop the column)"]


# --- categorical columns ----------------------------------------------------------------------------------

def test_text_and_bool_csv_columns_are_categorical(tmp_path):
    path = _csv(tmp_path, "colour,flag,n,y\nred,True,1,1.5\n green ,false,2,2.5\nblue,,3,3.5\nred,true,4,4.5\n")
    dataset = _quiet_load(path)
    assert dataset.feature_names == ("colour", "flag", "n")
    assert dataset.categories == {"colour": ("blue", "green", "red"), "flag": ("False", "True")}
    assert dataset.categorical_columns == (0, 1)
    np.testing.assert_array_equal(dataset.X, [[2.0, 1.0, 1.0], [1.0, 0.0, 2.0], [0.0, np.nan, 3.0],
                                              [2.0, 1.0, 4.0]])
    assert dataset.X.dtype == np.float64


def test_a_column_of_only_true_is_still_boolean(tmp_path):
    path = _csv(tmp_path, "flag,y\nTrue,1.5\nTrue,2.5\n,3.5\n")
    dataset = _quiet_load(path)
    assert dataset.categories == {"flag": ("False", "True")}
    np.testing.assert_array_equal(dataset.X[:, 0], [1.0, 1.0, np.nan])


def test_parquet_dictionary_and_pandas_category_columns_are_categorical(tmp_path):
    # pandas' category dtype is written as a dictionary column; one of numbers reads back as numbers, and
    # only pandas' metadata in the file says it was a category.
    path = tmp_path / "d.parquet"
    table = pa.table({"city": pa.array(["b", "a", None, "b"]).dictionary_encode(), "grade": [3, 1, 2, 10],
                      "y": [1.0, 2.0, 3.0, 4.0]})
    pandas_metadata = {"columns": [{"name": "city", "pandas_type": "categorical"},
                                   {"name": "grade", "pandas_type": "categorical"},
                                   {"name": "y", "pandas_type": "float64"}]}
    pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(pandas_metadata)}), path)
    dataset = _quiet_load(path)
    assert dataset.categories == {"city": ("a", "b"), "grade": ("1", "2", "3", "10")}  # numbers sort as numbers
    np.testing.assert_array_equal(dataset.X, [[1.0, 2.0], [0.0, 0.0], [np.nan, 1.0], [1.0, 3.0]])


def test_a_parquet_file_from_pandas(tmp_path):
    pd = pytest.importorskip("pandas")  # not a test need: only this check of what pandas writes
    path = tmp_path / "d.parquet"
    pd.DataFrame({"g": pd.Categorical([3, 1, None, 10]), "s": pd.Categorical(["a", "b", "a", None]),
                  "dummy": [True, False, True, False], "n": [1.5, None, 2.5, 3.5],
                  "y": [1.0, 2.0, 3.0, 4.0]}).to_parquet(path)
    dataset = _quiet_load(path)
    assert dataset.categories == {"g": ("1", "3", "10"), "s": ("a", "b"), "dummy": ("False", "True")}
    np.testing.assert_array_equal(dataset.X, [[1.0, 0.0, 1.0, 1.5], [0.0, 1.0, 0.0, np.nan],
                                              [np.nan, 0.0, 1.0, 2.5], [2.0, np.nan, 0.0, 3.5]])


def test_categorical_forces_numeric_columns_as_written(tmp_path):
    path = _csv(tmp_path, "zip,n,y\n1,1,1.5\n1.0,2,2.5\n2,3,3.5\n10,,4.5\n")
    dataset = _quiet_load(path, categorical=["zip"])
    assert dataset.categories == {"zip": ("1", "1.0", "2", "10")}  # as a CSV writes them, sorted as numbers
    np.testing.assert_array_equal(dataset.X, [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, np.nan]])


def test_categorical_forces_typed_columns_with_their_repr(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"i": [1, 2, 1], "f": [1.0, 2.5, None], "y": [1.0, 2.0, 3.0]}), path)
    dataset = _quiet_load(path, categorical=["i", "f"])
    assert dataset.categories == {"i": ("1", "2"), "f": ("1.0", "2.5")}
    np.testing.assert_array_equal(dataset.X, [[0.0, 0.0], [1.0, 1.0], [0.0, np.nan]])
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([{"a": 1, "y": 1}, {"a": 1.0, "y": 2}, {"a": True, "y": 3}]))
    assert _quiet_load(json_path, categorical=["a"]).categories == {"a": ("1", "1.0", "True")}
    npz_path = tmp_path / "d.npz"
    np.savez(npz_path, X=np.array([[3, 0], [1, 1], [3, 2]]), y=np.array([0.5, 1.5, 2.5]))
    dataset = load_dataset(DataRef(path=str(npz_path), categorical=["x0"]))
    assert dataset.categories == {"x0": ("1", "3")} and dataset.X[:, 0].tolist() == [1.0, 0.0, 1.0]


def test_an_unknown_categorical_name_is_a_problem(tmp_path):
    path = _csv(tmp_path, "a,b,y\n1,2,1.5\n3,4,2.5\n5,6,3.5\n")
    assert _problems(path, categorical=["b", "zz", "Zip"]) == [
        f"{path}: the data param's categorical names 'zz', 'Zip', not a column of the file; columns: 'a', 'b', 'y'"]


def test_a_parquet_column_of_another_type_is_a_problem_unless_categorical(tmp_path):
    path = tmp_path / "d.parquet"
    days = pa.array([datetime.date(2026, 1, 1), datetime.date(2026, 1, 2), None], pa.date32())
    pq.write_table(pa.table({"day": days, "y": [1.0, 2.0, 3.0]}), path)
    assert _problems(path) == [
        f"{path}: column 'day' has the type date32[day]: expected numbers, text, booleans or categories; list the "
        "column in the data param's 'categorical' to read its values as categories"]
    dataset = _quiet_load(path, categorical=["day"])
    assert dataset.categories == {"day": ("2026-01-01", "2026-01-02")}


# --- high cardinality -------------------------------------------------------------------------------------

def _cardinal_csv(tmp_path, distinct: int):
    # Label k appears k % 7 + 1 times: frequencies tie often, so the cut is decided by labels too.
    labels = [f"c{k:03d}" for k in range(distinct) for _ in range(k % 7 + 1)]
    rng = np.random.default_rng(0)
    rng.shuffle(labels)
    lines = "".join(f"{label},{i % 5}.5\n" for i, label in enumerate(labels))
    return _csv(tmp_path, "code,y\n" + lines), labels


def test_a_high_cardinality_column_is_capped_with_a_warning(tmp_path):
    path, labels = _cardinal_csv(tmp_path, 300)
    with pytest.warns(DataWarning) as caught:
        dataset = _load(path)
    assert [str(w.message) for w in caught if issubclass(w.category, DataWarning)] == [
        f"{path}: column 'code' has 300 distinct values, more than the cap of 256: the 255 most frequent are kept "
        "and the rest read as one category '(other)'; set the data param's max_categories to raise the cap"]
    vocabulary = dataset.categories["code"]
    counts = Counter(labels)
    expected = sorted(sorted(counts, key=lambda label: (-counts[label], label))[:255])
    assert vocabulary == (*expected, OTHER_CATEGORY) and len(vocabulary) == 256
    codes = dataset.X[:, 0]
    other = [label not in expected for label in labels]
    assert (codes[other] == 255).all() and sorted(set(codes[~np.array(other)].tolist())) == list(range(255))
    for label, code in zip(labels[:50], codes[:50]):
        assert vocabulary[int(code)] == (label if label in expected else OTHER_CATEGORY)


def test_max_categories_sets_the_cap(tmp_path):
    path, labels = _cardinal_csv(tmp_path, 300)
    assert _quiet_load(path, max_categories=300).categories["code"][-1] == "c299"  # not capped: no warning
    with pytest.warns(DataWarning, match="more than the cap of 10: the 9 most frequent are kept"):
        dataset = _load(path, max_categories=10)
    assert len(dataset.categories["code"]) == 10 and dataset.categories["code"][-1] == OTHER_CATEGORY
    with pytest.raises(DataError, match=r"the data param's max_categories 1: expected a whole number, at least 2"):
        _load(path, max_categories=1)


# --- the target and the task ------------------------------------------------------------------------------

@pytest.mark.parametrize("values, task, classes, y", [
    (["1.5", "2.5", "7"], "regression", (), [1.5, 2.5, 7.0]),
    (["1", "0", "1"], "binary", ("0", "1"), [1.0, 0.0, 1.0]),
    (["1.0", "0.0", "1.0"], "binary", ("0", "1"), [1.0, 0.0, 1.0]),
    (["10", "9", "10"], "binary", ("9", "10"), [1.0, 0.0, 1.0]),  # sorted as numbers
    (["yes", "no", "yes"], "binary", ("no", "yes"), [1.0, 0.0, 1.0]),
    (["True", "False", "True"], "binary", ("False", "True"), [1.0, 0.0, 1.0]),
    (["cat", "dog", "bird"], "multiclass", ("bird", "cat", "dog"), [1.0, 2.0, 0.0]),
    (["1", "2", "3"], "regression", (), [1.0, 2.0, 3.0]),  # a number with three values is a quantity
])
def test_the_task_is_inferred_from_the_target(tmp_path, values, task, classes, y):
    path = _csv(tmp_path, "a,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values)))
    dataset = _quiet_load(path, target="label")
    assert (dataset.task, dataset.classes, dataset.y.tolist()) == (task, classes, y)
    assert dataset.target == "label" and dataset.y.dtype == np.float64


def test_parquet_and_json_targets(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": [True, False, True]}), path)
    dataset = _quiet_load(path)
    assert (dataset.task, dataset.classes, dataset.y.tolist()) == ("binary", ("False", "True"), [1.0, 0.0, 1.0])
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": pa.array(["b", "a", "c"]).dictionary_encode()}), path)
    assert _quiet_load(path).classes == ("a", "b", "c")
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([{"a": 1, "y": 0}, {"a": 2, "y": 1}, {"a": 3, "y": 1}]))
    assert _quiet_load(json_path).classes == ("0", "1")


def test_an_explicit_task(tmp_path):
    path = _csv(tmp_path, "a,y\n1,0\n2,1\n3,1\n4,10\n5,2\n")
    assert _quiet_load(path).task == "regression"
    dataset = _quiet_load(path, task="multiclass")
    assert (dataset.classes, dataset.y.tolist()) == (("0", "1", "2", "10"), [0.0, 1.0, 1.0, 3.0, 2.0])
    binary = _csv(tmp_path, "a,y\n1,0\n2,1\n3,1\n", name="binary.csv")
    dataset = _quiet_load(binary, task="regression")
    assert (dataset.task, dataset.classes, dataset.y.tolist()) == ("regression", (), [0.0, 1.0, 1.0])
    # A numeric column listed as categorical is classes too.
    assert _quiet_load(path, categorical=["y"]).classes == ("0", "1", "2", "10")


def test_explicit_task_mismatches_are_problems(tmp_path):
    text = _csv(tmp_path, "a,y\n1,1.5\n2,high\n3,low\n", name="text.csv")
    assert _problems(text, task="regression") == [
        f"{text}: target column 'y' is not numeric: data row 2 holds 'high': the task regression expects numbers; "
        "set the data param's task to binary or multiclass (or auto) for classes"]
    three = _csv(tmp_path, "a,y\n1,a\n2,b\n3,c\n", name="three.csv")
    assert _problems(three, task="binary") == [
        f"{three}: target column 'y' has 3 classes: the task binary expects exactly 2; set the data param's task to "
        "multiclass (or auto)"]
    two = _csv(tmp_path, "a,y\n1,0\n2,1\n3,0\n", name="two.csv")
    assert _problems(two, task="multiclass") == [
        f"{two}: target column 'y' has 2 classes: the task multiclass expects at least 3; set the data param's task "
        "to binary (or auto)"]
    many = _csv(tmp_path, "a,y\n1,0.5\n2,1.5\n3,2.5\n", name="many.csv")
    assert _problems(many, task="binary")[0].endswith("target column 'y' has 3 classes: the task binary expects "
                                                      "exactly 2; set the data param's task to multiclass (or auto)")
    assert _problems(two, task="regression", categorical=["y"]) == [
        f"{two}: target column 'y' is categorical (listed in the data param's 'categorical'): the task regression "
        "expects numbers; set the data param's task to binary or multiclass (or auto) for classes"]
    with pytest.raises(DataError, match=r"the data param's task 'classification' is not one of auto, regression, "
                                        r"binary, multiclass$"):
        _load(two, task="classification")


def test_a_constant_target_is_a_problem_for_every_task(tmp_path):
    text = _csv(tmp_path, "a,y\n1,a\n2,a\n3,\n", name="text.csv")
    assert _problems(text, drop_missing_target=True) == [
        f"{text}: target column 'y' is constant: R² is undefined; expected at least two different values, found "
        "only 'a'"]
    assert _problems(text, task="binary", drop_missing_target=True) == [
        f"{text}: target column 'y' is constant: the task binary expects at least two classes, found only 'a'"]


def test_a_class_with_a_single_row_loads(tmp_path):
    path = _csv(tmp_path, "a,y\n1,a\n2,a\n3,b\n4,b\n5,c\n")
    dataset = _quiet_load(path)
    assert (dataset.task, dataset.classes, dataset.y.tolist()) == ("multiclass", ("a", "b", "c"),
                                                                   [0.0, 0.0, 1.0, 1.0, 2.0])


# --- missing target values --------------------------------------------------------------------------------

def _gappy_target(tmp_path):
    rows = []
    for i in range(1, 21):
        target = "" if i in (3, 7, 12, 13, 15, 18, 19) else "NA" if i == 20 else f"{i * 1.5}"
        colour = "" if i == 7 else "only-in-a-dropped-row" if i == 12 else ("red", "blue")[i % 2]
        rows.append(f"{i},{colour},{target}\n")
    return _csv(tmp_path, "a,colour,y\n" + "".join(rows))


def test_a_missing_target_is_a_problem_naming_its_first_rows(tmp_path):
    path = _gappy_target(tmp_path)
    assert _problems(path) == [
        f"{path}: target column 'y' is missing at data rows 3, 7, 12, 13, 15 and 3 more: expected a value in every "
        "row; to drop the rows without one, set the data param's drop_missing_target: true"]
    few = _csv(tmp_path, "a,y\n1,1.5\n2,\n3,2.5\n4,NA\n", name="few.csv")
    assert _problems(few)[0].startswith(f"{few}: target column 'y' is missing at data rows 2 and 4: ")


def test_drop_missing_target_drops_those_rows_with_a_warning(tmp_path):
    path = _gappy_target(tmp_path)
    with pytest.warns(DataWarning) as caught:
        dataset = _load(path, drop_missing_target=True)
    assert [str(w.message) for w in caught if issubclass(w.category, DataWarning)] == [
        f"{path}: 8 row(s) without a target value dropped (data rows 3, 7, 12, 13, 15 and 3 more), as "
        "drop_missing_target asks"]
    kept = [i for i in range(1, 21) if i not in (3, 7, 12, 13, 15, 18, 19, 20)]
    assert dataset.n_rows == 12 and dataset.X[:, 0].tolist() == [float(i) for i in kept]
    assert dataset.y.tolist() == [i * 1.5 for i in kept]
    assert dataset.categories == {"colour": ("blue", "red")}  # the vocabulary of the rows kept


def test_problems_after_dropping_name_the_files_rows(tmp_path):
    path = _csv(tmp_path, "a,y\n1,\n2,1.5\ninf,2.5\n4,3.5\n")
    assert _problems(path, drop_missing_target=True) == [
        f"{path}: column 'a' has a non-finite value (inf) at data row 3: expected finite numbers (an empty cell for "
        "a missing value)"]
    alone = _csv(tmp_path, "a,y\n1,\n2,1.5\n", name="alone.csv")
    assert _problems(alone, drop_missing_target=True) == [f"{alone}: 1 row(s) with a target value: expected at least 2"]


# --- every problem at once --------------------------------------------------------------------------------

def test_every_problem_of_a_csv_file_in_one_error_a_line_each(tmp_path):
    path = _csv(tmp_path, "\n".join([
        "a,empty,b,y,n",
        "1,,2,1.5,inf",
        "2,NA,3,,4",
        "3,,x,2.5,-inf",
        "4,,5,,6",
        "",
    ]))
    lines = _problems(path, categorical=["zz"])
    assert lines == [
        f"{path}: the data param's categorical names 'zz', not a column of the file; columns: 'a', 'empty', 'b', "
        "'y', 'n'",
        f"{path}: column 'empty' has no values: every cell is missing: expected at least one value (or drop the "
        "column)",
        f"{path}: target column 'y' is missing at data rows 2 and 4: expected a value in every row; to drop the rows "
        "without one, set the data param's drop_missing_target: true",
        f"{path}: column 'n' has a non-finite value (-inf, inf) at data rows 1 and 3: expected finite numbers (an "
        "empty cell for a missing value)",
    ]
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_every_problem_of_a_json_file_names_records(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1, "b": [1], "c": None, "y": None}, {"a": 2, "b": 2, "c": None, "y": "x"},
                                {"a": 3, "b": 3, "c": None, "y": "z"}]).replace('"a": 2', '"a": Infinity'))
    assert _problems(path) == [
        f"{path}: column 'a' has a non-finite value (inf) at record 2: expected finite numbers (an empty cell for a "
        "missing value)",
        f"{path}: column 'b' holds values that are no number, text or boolean: record 1 holds [1]: expected a "
        "number, text, a boolean or null in each cell",
        f"{path}: column 'c' has no values: every cell is missing: expected at least one value (or drop the column)",
        f"{path}: target column 'y' is missing at record 1: expected a value in every row; to drop the rows without "
        "one, set the data param's drop_missing_target: true",
    ]


def test_every_problem_of_a_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": [1.0, float("inf"), 3.0], "n": pa.array([None, None, None], pa.float64()),
                             "y": ["a", "b", "c"]}), path)
    assert _problems(path, task="binary") == [
        f"{path}: column 'a' has a non-finite value (inf) at data row 2: expected finite numbers (an empty cell for "
        "a missing value)",
        f"{path}: column 'n' has no values: every cell is missing: expected at least one value (or drop the column)",
        f"{path}: target column 'y' has 3 classes: the task binary expects exactly 2; set the data param's task to "
        "multiclass (or auto)",
    ]


def test_the_cli_prints_every_problem_on_its_own_line_and_exits_2(tmp_path):
    path = _csv(tmp_path, "a,empty,y\ninf,,1.5\n2,,\n3,,2.5\n")
    out_dir = tmp_path / "out"
    params = {"data": {"path": path, "target": "y"}, "output_dir": str(out_dir), "model_types": ["nn"]}
    result = subprocess.run([sys.executable, "-m", "watcher_plugins.agent", "--run-pipeline", "--start-step", "5",
                             "--end-step", "5", "--params", json.dumps(params)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("watcher-agent: step ")]
    expected = [
        f"{path}: column 'a' has a non-finite value (inf) at data row 1: expected finite numbers (an empty cell for "
        "a missing value)",
        f"{path}: column 'empty' has no values: every cell is missing: expected at least one value (or drop the "
        "column)",
        f"{path}: target column 'y' is missing at data row 2: expected a value in every row; to drop the rows "
        "without one, set the data param's drop_missing_target: true",
    ]
    assert len(lines) == len(expected) and all(line.endswith(problem) for line, problem in zip(lines, expected))
    assert lines == [f"watcher-agent: error: {problem}" for problem in expected]  # each line says what it is
    assert "Traceback" not in result.stderr and not out_dir.exists()


# --- float64 ----------------------------------------------------------------------------------------------

def test_a_target_with_a_large_offset_keeps_its_distinct_values(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.standard_normal(4000) + 2e7
    x = rng.standard_normal(4000) + 2e7
    assert len(np.unique(y.astype(np.float32))) < 100  # what float32 made of it
    path = tmp_path / "offset.csv"
    path.write_text("x,y\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(x, y)))
    dataset = _quiet_load(path)
    assert dataset.task == "regression" and dataset.y.dtype == np.float64
    assert len(np.unique(dataset.y)) == 4000 and dataset.y.tolist() == y.tolist()
    assert dataset.X[:, 0].tolist() == x.tolist()
    pq_path = tmp_path / "offset.parquet"
    pq.write_table(pa.table({"x": x, "y": y}), pq_path)
    assert len(np.unique(_quiet_load(pq_path).y)) == 4000


def test_the_fingerprint_covers_categories_classes_and_task(tmp_path):
    a = _csv(tmp_path, "c,y\nred,1\nblue,0\nred,1\n", name="a.csv")
    b = _csv(tmp_path, "c,y\nred,1.0\nblue,0.0\nred,1.0\n", name="b.csv")
    first, second = _quiet_load(a), _quiet_load(b)
    assert first.sha256() == second.sha256()  # "1.0" for "1": the same data
    assert _quiet_load(a, task="regression").sha256() != first.sha256()
    renamed = _csv(tmp_path, "c,y\nrouge,1\nblue,0\nrouge,1\n", name="c.csv")
    assert _quiet_load(renamed).sha256() != first.sha256()  # same codes, other vocabulary


def test_a_row_of_empty_cells_is_a_row_and_a_blank_line_is_not(tmp_path):
    path = _csv(tmp_path, "a,b,y\n1,x,1.5\n,,2.0\n\n3,y,2.5\n4,x,3.5\n")
    dataset = load_dataset(DataRef(path=path, target="y"))
    assert dataset.n_rows == 4 and np.isnan(dataset.X[1]).all()
