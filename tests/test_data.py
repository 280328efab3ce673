"""Datasets: the embedded default, users' files, and a clear error for every bad file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from watcher_plugins.data import (
    FULL_ROWS,
    N_FEATURES,
    DataWarning,
    _generate_survivors,
    embedded_survivors,
    kfold_splits,
    load_dataset,
    r2_score,
)
from watcher_plugins.errors import DataError
from watcher_plugins.records import DataRef


def test_embedded_survivors_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("WATCHER_CACHE_DIR", str(tmp_path))
    first = embedded_survivors(500)
    assert first.X.shape == (500, N_FEATURES) and first.X.dtype == np.float64 and first.y.shape == (500,)
    assert first.y.dtype == np.float64 and first.task == "regression" and not first.categories
    assert len(list(tmp_path.glob("survivors-*.npz"))) == 1
    again = embedded_survivors(500)
    np.testing.assert_array_equal(first.X, again.X)
    np.testing.assert_array_equal(first.y, again.y)
    full = embedded_survivors(FULL_ROWS)
    np.testing.assert_array_equal(full.X[:500], first.X)  # the small sizes are prefixes of the full table


def test_embedded_survivors_are_todays_float32_values_in_float64(tmp_path, monkeypatch):
    # The survivors results stay bit-identical: the float64 arrays hold exactly the float32 table's values.
    monkeypatch.setenv("WATCHER_CACHE_DIR", str(tmp_path))
    X32, y32 = _generate_survivors()
    assert X32.dtype == np.float32 and y32.dtype == np.float32
    for rows in (6000, FULL_ROWS):
        data = embedded_survivors(rows)
        assert data.X.dtype == np.float64 and data.y.dtype == np.float64
        assert data.X.astype(np.float32).tobytes() == X32[:rows].tobytes()
        assert data.y.astype(np.float32).tobytes() == y32[:rows].tobytes()
        assert np.array_equal(data.X, X32[:rows].astype(np.float64))
        assert data.feature_names == tuple(f"f{i:02d}" for i in range(N_FEATURES))
        assert data.categorical_columns == () and data.classes == () and data.target == "y"
    # From the cache, as from a fresh generation.
    np.testing.assert_array_equal(embedded_survivors(6000).X, X32[:6000])


def test_embedded_survivors_damaged_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("WATCHER_CACHE_DIR", str(tmp_path))
    reference = embedded_survivors(100)
    (cache,) = tmp_path.glob("survivors-*.npz")
    cache.write_bytes(b"not an npz")
    np.testing.assert_array_equal(embedded_survivors(100).X, reference.X)


def test_embedded_survivors_truncated_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("WATCHER_CACHE_DIR", str(tmp_path))
    reference = embedded_survivors(100)
    (cache,) = tmp_path.glob("survivors-*.npz")
    cache.write_bytes(cache.read_bytes()[:5000])  # a real archive cut short, as by a full disk
    np.testing.assert_array_equal(embedded_survivors(100).X, reference.X)


def test_unwritable_cache_directory_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("WATCHER_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(DataError, match=r"cannot write the embedded dataset's cache .*a-file/cache.*WATCHER_CACHE_DIR"):
        embedded_survivors(100)


def test_the_target_is_learnable_but_not_trivial():
    data = embedded_survivors(4000)
    X = np.column_stack([data.X, np.ones(len(data.X))])
    coef, *_ = np.linalg.lstsq(X[:3000], data.y[:3000], rcond=None)
    linear_r2 = r2_score(data.y[3000:], X[3000:] @ coef)
    assert 0.2 < linear_r2 < 0.8  # a linear model finds some of it; nonlinear models have room to do better


def test_npz_csv_json_loaders_agree(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3)).astype(np.float32)
    y = rng.standard_normal(20).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    header = "a,b,c,score\n"
    (tmp_path / "d.csv").write_text(header + "\n".join(",".join(map(repr, [*map(float, r), float(t)]))
                                                        for r, t in zip(X, y)))
    records = [{"a": float(r[0]), "b": float(r[1]), "c": float(r[2]), "score": float(t)} for r, t in zip(X, y)]
    (tmp_path / "d.json").write_text(json.dumps({"survivors": records}))
    loaded = [load_dataset(DataRef(path=str(tmp_path / "d.npz"))),
              load_dataset(DataRef(path=str(tmp_path / "d.csv"), target="score")),
              load_dataset(DataRef(path=str(tmp_path / "d.json"), target="score"))]
    for dataset in loaded:
        np.testing.assert_allclose(dataset.X, X, rtol=1e-6)
        np.testing.assert_allclose(dataset.y, y, rtol=1e-6)
    assert loaded[1].feature_names == ("a", "b", "c")


def test_parquet_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x1": [1.0, 2.0, 3.0], "x2": [0.5, 0.1, 0.2], "y": [1.0, 0.0, 1.0]}), tmp_path / "d.parquet")
    dataset = load_dataset(DataRef(path=str(tmp_path / "d.parquet"), target="y"))
    assert dataset.X.shape == (3, 2) and dataset.y.tolist() == [1.0, 0.0, 1.0]


def _csv(tmp_path, text, name="bad.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, target, message", [
    ("a,b,y\n1,2,3\n4,5,6\n", "score", "target column 'score' not found; columns: 'a', 'b', 'y'"),
    ("a,b,y\n1,-inf,3\n4,inf,6\n", "y", "column 'b' has a non-finite value (-inf, inf) at data rows 1 and 2: "
                                        "expected finite numbers (an empty cell for a missing value)"),
    ("a,b,y\n1,2,inf\n4,5,6\n7,8,9\n", "y", "target column 'y' has a non-finite value (inf) at data row 1: "
                                            "expected finite numbers"),
    ("a,b,y\n1,2,3\n4,1e400,6\n", "y", "column 'b' has a non-finite value (inf) at data row 2"),  # beyond float64
    ("a,b,y\n1,2\n", "y", "line 2 has 2 fields: expected 3"),
    ("a,a,y\n1,2,3\n", "y", "column name(s) 'a' appear more than once in the header"),
    ("a,,y\n1,2,3\n4,5,6\n", "y", "column 2 has no name in the header"),
    ("a,b,y\n1,2,3\n\n4,5\n", "y", "line 4 has 2 fields: expected 3"),  # the file's line, blank lines counted
    ("", "y", "empty CSV file"),
    ("a,y\n", "y", "no data rows below the header"),
])
def test_bad_csv_names_the_file_and_the_column(tmp_path, text, target, message):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=path, target=target))
    assert str(excinfo.value) == f"{path}: {message}" or str(excinfo.value).startswith(f"{path}: {message}")


def test_csv_saved_by_excel_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("quality,a,b\n1,2,3\n4,5,6\n", encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    dataset = load_dataset(DataRef(path=str(path), target="quality"))
    assert dataset.feature_names == ("a", "b") and dataset.target == "quality"
    assert dataset.task == "binary" and dataset.classes == ("1", "4") and dataset.y.tolist() == [0.0, 1.0]


def test_csv_numbers_with_spaces_and_python_spellings_still_load(tmp_path):
    path = _csv(tmp_path, "a,y\n 1 ,+.5\n2.,1e1\n-3E-1,7\n4\u00a0,8\n", name="spaced.csv")
    dataset = load_dataset(DataRef(path=path, target="y"))
    assert dataset.X[:, 0].tolist() == [1.0, 2.0, -0.3, 4.0]  # float64: exactly as written
    assert dataset.y.tolist() == [0.5, 10.0, 7.0, 8.0] and dataset.task == "regression"


@pytest.mark.parametrize("cell, vocabulary, codes", [
    ("1_000", ("1_000", "2", "8"), [1.0, 0.0, 2.0]),  # sorted as strings: not every label is a number
    ("\uff15", ("2", "8", "\uff15"), [0.0, 2.0, 1.0]),
    ("oops", ("2", "8", "oops"), [0.0, 2.0, 1.0]),
])
def test_csv_cells_that_float_takes_but_a_csv_does_not_mean_make_a_column_categorical(tmp_path, cell, vocabulary,
                                                                                        codes):
    # float() takes "1_000" and non-ASCII digits; a data file does not mean numbers by them.
    path = _csv(tmp_path, f"a,b,y\n1,2,3\n4,{cell},6\n7,8,9\n")
    with pytest.warns(DataWarning, match=rf"column 'b' is read as categorical: 1 of its 3 values are not numbers "
                                         rf"\(data row 2 holds '{cell}'\)"):
        dataset = load_dataset(DataRef(path=path, target="y"))
    assert dataset.categories["b"] == vocabulary and dataset.X[:, 1].tolist() == codes
    assert dataset.categorical_columns == (1,)


def test_json_string_with_underscores_is_text(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1, "y": 1}, {"a": "1_000", "y": 2}, {"a": 1, "y": 3}]))
    with pytest.warns(DataWarning, match=r"column 'a' is read as categorical: 1 of its 3 values are not numbers "
                                         r"\(record 2 holds \"1_000\"\)"):
        dataset = load_dataset(DataRef(path=str(path), target="y"))
    assert dataset.categories == {"a": ("1", "1_000")} and dataset.X[:, 0].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("text, line", [
    ("a,b" + "x" * 200_000 + ",y\n1,2,3\n4,5,6\n", 1),
    ("a,b,y\n1,2,3\n4," + "5" * 200_000 + ",6\n", 3),
])
def test_csv_field_beyond_the_csv_modules_limit_names_the_file_and_line(tmp_path, text, line):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=path, target="y"))
    assert str(excinfo.value) == (f"{path}: line {line} has a field longer than 131072 characters: "
                                  "expected column names and numbers")


def test_a_wide_header_names_its_duplicate_columns(tmp_path):
    # 5,000 columns, one name twice. (Counting each name with list.count made 50,000 columns take 30 s;
    # the check counts them once now. No clock here: tests assert behaviour, benchmarks time it.)
    names = [f"c{i}" for i in range(5_000)]
    path = _csv(tmp_path, ",".join([*names, "c7", "y"]) + "\n" + ",".join(["1"] * 5_002) + "\n")
    with pytest.raises(DataError, match=r"column name\(s\) 'c7' appear more than once in the header"):
        load_dataset(DataRef(path=path, target="y"))


def _constant_target_files(tmp_path):
    rows = [(0.5, 3.0), (1.5, 3.0), (2.5, 3.0)]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("a,quality\n" + "".join(f"{a},{q}\n" for a, q in rows))
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps([{"a": a, "quality": q} for a, q in rows]))
    npz_path = tmp_path / "c.npz"
    np.savez(npz_path, X=np.array([[a] for a, _ in rows]), y=np.array([q for _, q in rows]))
    files = [(csv_path, "quality"), (json_path, "quality"), (npz_path, "y")]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return files
    parquet_path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"a": [a for a, _ in rows], "quality": [q for _, q in rows]}), parquet_path)
    return [*files, (parquet_path, "quality")]


def test_constant_target_is_refused_in_every_format(tmp_path):
    files = _constant_target_files(tmp_path)
    for path, target in files:
        with pytest.raises(DataError) as excinfo:
            load_dataset(DataRef(path=str(path), target=target if path.suffix != ".npz" else None))
        assert str(excinfo.value) == (f"{path}: target column {target!r} is constant: R² is undefined; "
                                      "expected at least two different values, found only 3")
    # A constant feature is harmless (the models ignore it); only the target must vary.
    path = _csv(tmp_path, "a,quality\n1,1\n1,2\n1,5\n", name="constfeature.csv")
    assert load_dataset(DataRef(path=path, target="quality")).y.tolist() == [1.0, 2.0, 5.0]


def test_parquet_duplicate_column_names_give_the_csv_readers_message(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays([pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array([1.0, 0.0])],
                                 names=["a", "a", "y"])
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=str(path), target="y"))
    assert str(excinfo.value) == f"{path}: column name(s) 'a' appear more than once in the parquet schema"


def test_csv_blank_lines_are_skipped(tmp_path):
    path = _csv(tmp_path, "\na,b,y\n1,2,3\n\n4,5,6\n\n", name="blank.csv")
    dataset = load_dataset(DataRef(path=path, target="y", task="regression"))
    assert dataset.X.tolist() == [[1.0, 2.0], [4.0, 5.0]] and dataset.y.tolist() == [3.0, 6.0]


def test_csv_values_beyond_float32_load_as_float64_without_a_warning(tmp_path):
    # float64 now: a value float32 cannot hold is no problem (the models scale before any float32 cast).
    path = _csv(tmp_path, "a,b,y\n1,2,-1e39\n4,1e39,6\n7,3.4028235e38,1e300\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no numpy overflow warning
        warnings.simplefilter("error", DataWarning)
        dataset = load_dataset(DataRef(path=path, target="y"))
    assert dataset.X[:, 1].tolist() == [2.0, 1e39, 3.4028235e38] and dataset.y.tolist() == [-1e39, 6.0, 1e300]
    assert dataset.X.dtype == np.float64 and dataset.y.dtype == np.float64


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="absent.csv: data file not found"):
        load_dataset(DataRef(path=path, target="y"))


def test_missing_relative_path_says_what_it_was_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path="absent.csv", target="y"))
    assert str(excinfo.value) == ("absent.csv: data file not found (a relative path, resolved against the "
                                  f"current directory {tmp_path.resolve()})")


@pytest.mark.parametrize("name", ["data.csv", "data"])
def test_a_directory_is_not_called_missing(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=str(tmp_path / name), target="y"))
    assert str(excinfo.value) == f"{tmp_path / name}: is a directory: expected a data file"


def test_unreadable_file(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="binary.csv: cannot read the csv file"):
        load_dataset(DataRef(path=str(path), target="y"))


def test_npz_without_y(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((3, 2)))
    with pytest.raises(DataError, match="missing array y"):
        load_dataset(DataRef(path=str(tmp_path / "d.npz")))


def test_unknown_suffix_and_missing_target(tmp_path):
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_dataset(DataRef(path=str(tmp_path / "d.txt")))
    path = _csv(tmp_path, "a,y\n1,2\n")
    with pytest.raises(DataError, match="needs the data param's 'target'"):
        load_dataset(DataRef(path=path))
    # A format the loader does not know is refused by name, not read as some other format.
    with pytest.raises(DataError, match="the data param's format 'xyz' is not one of npz, csv, parquet, json"):
        load_dataset(DataRef(path=path, target="y", format="xyz"))


def test_kfold_splits_partition_the_rows_deterministically():
    splits = kfold_splits(103, 5, seed=7)
    assert len(splits) == 5
    held_out = np.concatenate([val for _, val in splits])
    assert sorted(held_out.tolist()) == list(range(103))
    for train, val in splits:
        assert not set(train) & set(val) and len(train) + len(val) == 103
    again = kfold_splits(103, 5, seed=7)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    assert not np.array_equal(kfold_splits(103, 5, seed=8)[0][1], splits[0][1])


@pytest.mark.parametrize("value, categories, codes", [
    (True, ("2", "4", "True"), [0.0, 2.0, 1.0]),  # JSON's true never reads as 1.0: the column is categorical
    (False, ("2", "4", "False"), [0.0, 2.0, 1.0]),
    (None, None, [2.0, np.nan, 4.0]),  # null is missing
])
def test_json_values_that_are_not_numbers(tmp_path, value, categories, codes):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1, "b": 2, "y": 1}, {"a": 2, "b": value, "y": 2}, {"a": 3, "b": 4, "y": 3}]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        dataset = load_dataset(DataRef(path=str(path), target="y"))
    # A mostly numeric column read as categorical says why.
    messages = [str(w.message).split(": ", 1)[1] for w in caught if issubclass(w.category, DataWarning)]
    assert messages == ([] if categories is None else [
        f"column 'b' is read as categorical: 1 of its 3 values are not numbers (record 2 holds {json.dumps(value)}); "
        "if the column is numeric, fix those cells or mark them missing (an empty cell, or one of NA, N/A, NaN, "
        "nan, null, NULL, None, #N/A)"])
    assert dataset.categories.get("b") == categories
    np.testing.assert_array_equal(dataset.X[:, 1], codes)


def test_json_lists_and_objects_are_refused(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1, "b": 2, "y": 1}, {"a": 2, "b": [1], "y": 2}, {"a": 3, "b": {}, "y": 3}]))
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=str(path), target="y"))
    assert str(excinfo.value) == (f"{path}: column 'b' holds values that are no number, text or boolean: "
                                  "record 2 holds [1], record 3 holds {}: expected a number, text, a boolean or "
                                  "null in each cell")


def test_parquet_booleans_are_categorical(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"flag": [True, False, True, None], "y": [1.0, 0.0, 2.0, 3.0]}), path)
    dataset = load_dataset(DataRef(path=str(path), target="y"))
    assert dataset.categories == {"flag": ("False", "True")}
    np.testing.assert_array_equal(dataset.X[:, 0], [1.0, 0.0, 1.0, np.nan])


def test_json_records_are_counted_from_1_in_every_message(tmp_path):
    path = tmp_path / "d.json"
    records = [{"a": i, "y": i % 3} for i in range(8)]
    path.write_text(json.dumps([*records[:5], {"a": 5, "z": 1}, *records[6:]]))
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=str(path), target="y"))
    assert str(excinfo.value) == f"{path}: record 6 has fields ['a', 'z']: expected ['a', 'y'] as record 1"
    path.write_text(json.dumps([*records[:5], {"a": [2], "y": 1}, *records[6:]]))
    with pytest.raises(DataError, match=r"column 'a' holds values that are no number, text or boolean: record 6 "
                                        r"holds \[2\]"):
        load_dataset(DataRef(path=str(path), target="y"))
    path.write_text(json.dumps(records[:5]).replace('"a": 4', '"a": Infinity'))  # Python's reader takes it
    with pytest.raises(DataError, match=r"column 'a' has a non-finite value \(inf\) at record 5: "):
        load_dataset(DataRef(path=str(path), target="y"))
    path.write_text(json.dumps(records[:5]).replace('"a": 4', '"a": NaN'))  # NaN: missing, as null is
    assert np.isnan(load_dataset(DataRef(path=str(path), target="y")).X[4, 0])


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1, "t": 1}, {"a": 1, "a": 2, "t": 3}]', "record 2 has the key 'a' more than once: "
                                                      "expected unique column names"),
    ('{"survivors": [{"a": 1, "a": 2, "t": 3}, {"a": 2, "t": 4}]}', "record 1 has the key 'a' more than once: "
                                                                   "expected unique column names"),
    ('{"survivors": [{"a": 1, "t": 3}], "survivors": [{"a": 2, "t": 4}]}',
     "the key 'survivors' appears more than once"),
])
def test_json_duplicate_keys_are_refused_not_overwritten(tmp_path, text, message):
    # json.loads keeps the last value of a repeated key: the file's other value would vanish unseen.
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=str(path), target="t"))
    assert str(excinfo.value) == f"{path}: {message}"


@pytest.mark.parametrize("name", ["d.json", "wrapped.json"])
def test_json_numbers_written_as_strings_are_not_numbers(tmp_path, name):
    records = [{"a": 1, "t": 1}, {"a": "1.5", "t": 2}, {"a": 3, "t": 3}]
    path = tmp_path / name
    path.write_text(json.dumps(records if name == "d.json" else {"survivors": records}))
    with pytest.warns(DataWarning) as caught:
        dataset = load_dataset(DataRef(path=str(path), target="t"))
    assert [str(w.message) for w in caught if issubclass(w.category, DataWarning)] == [
        f"{path}: column 'a' is read as categorical: 1 of its 3 values are not numbers (record 2 holds \"1.5\"); "
        "if the column is numeric, fix those cells or mark them missing (an empty cell, or one of NA, N/A, NaN, "
        "nan, null, NULL, None, #N/A)"]
    assert dataset.categories["a"] == ("1", "1.5", "3")  # the labels sorted as numbers
    # A CSV has only text: there "1.5" is the number.
    csv_path = _csv(tmp_path, "a,t\n1,1\n1.5,2\n3,3\n", name="d.csv")
    assert load_dataset(DataRef(path=csv_path, target="t")).X[:, 0].tolist() == [1.0, 1.5, 3.0]


def test_parquet_numbers_stored_as_strings_are_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": ["1", "10", "3"], "t": [1.0, 2.0, 3.0]}), path)
    dataset = load_dataset(DataRef(path=str(path), target="t"))
    assert dataset.categories == {"a": ("1", "3", "10")} and dataset.X[:, 0].tolist() == [0.0, 2.0, 1.0]


def test_a_target_column_with_spaces_in_the_header_is_named_visibly(tmp_path):
    path = _csv(tmp_path, "a, t\n1,2\n3,4\n")
    with pytest.raises(DataError) as excinfo:
        load_dataset(DataRef(path=path, target="t"))
    assert str(excinfo.value) == (f"{path}: target column 't' not found; columns: 'a', ' t'; column ' t' has "
                                  "surrounding spaces: remove them from the file, or name the target ' t'")
    # As the message says, the target named with its spaces loads.
    assert load_dataset(DataRef(path=path, target=" t")).classes == ("2", "4")


def test_npz_missing_arrays_quote_the_arrays_found(tmp_path):
    np.savez(tmp_path / "d.npz", **{"X ": np.zeros((3, 2)), "y": np.zeros(3)})
    with pytest.raises(DataError, match=r"missing array X: .*; found 'X ', 'y'$"):
        load_dataset(DataRef(path=str(tmp_path / "d.npz")))
