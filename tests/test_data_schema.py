"""A model's inputs for new rows (#20): FeatureSchema (Dataset.schema(), saved as JSON with a model) and
load_features/encode_rows, which read and encode new rows with the training data's vocabularies."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from watcher_plugins.data import (
    OTHER_CATEGORY,
    Dataset,
    DataWarning,
    FeatureSchema,
    encode_rows,
    load_dataset,
    load_features,
)
from watcher_plugins.errors import DataError
from watcher_plugins.records import DataRef

TRAIN = "size,colour,flag,zip,y\n1.5,red,True,1,a\n2.5,blue,false,2,b\n,green,,1.0,a\n4,red,True,10,c\n"


def _file(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def trained(tmp_path) -> Dataset:
    path = _file(tmp_path, TRAIN, "train.csv")
    return load_dataset(DataRef(path=str(path), target="y", categorical=["zip"]))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return fn(*args, **kwargs)


def test_the_schema_of_a_dataset(trained):
    schema = trained.schema()
    assert schema == FeatureSchema(feature_names=("size", "colour", "flag", "zip"),
                                   categories={"colour": ("blue", "green", "red"), "flag": ("False", "True"),
                                               "zip": ("1", "1.0", "2", "10")},
                                   task="multiclass", classes=("a", "b", "c"), target="y")
    assert schema.categorical_columns == trained.categorical_columns == (1, 2, 3)


def test_the_schema_round_trips_through_json(trained):
    schema = trained.schema()
    text = json.dumps(schema.to_json())
    assert json.loads(text) == {
        "version": 1, "feature_names": ["size", "colour", "flag", "zip"],
        "categories": {"colour": ["blue", "green", "red"], "flag": ["False", "True"], "zip": ["1", "1.0", "2", "10"]},
        "task": "multiclass", "classes": ["a", "b", "c"], "target": "y"}
    again = FeatureSchema.from_json(json.loads(text))
    assert again == schema and hash(again) == hash(schema)
    regression = FeatureSchema(feature_names=("a", "b"))
    assert FeatureSchema.from_json(json.loads(json.dumps(regression.to_json()))) == regression


@pytest.mark.parametrize("change, message", [
    ({"version": 2}, "version 2: expected 1"),
    ({"feature_names": "a"}, "'feature_names' must be a list of column names"),
    ({"categories": {"zz": ["x"]}}, "'categories' names 'zz', not in 'feature_names'"),
    ({"categories": {"colour": [1]}}, "'categories' must map column names to lists of labels"),
    ({"task": "auto"}, "task 'auto': expected one of regression, binary, multiclass"),
    ({"classes": "ab"}, "'classes' must be a list of labels"),
])
def test_a_damaged_schema_is_a_data_error(trained, change, message):
    with pytest.raises(DataError) as excinfo:
        FeatureSchema.from_json({**trained.schema().to_json(), **change})
    assert str(excinfo.value) == f"feature schema: {message}"


def test_load_features_encodes_the_training_file_as_training_did(tmp_path, trained):
    X = _quiet(load_features, tmp_path / "train.csv", trained.schema())
    np.testing.assert_array_equal(X, trained.X)
    assert X.dtype == np.float64
    np.testing.assert_array_equal(_quiet(load_features, tmp_path / "train.csv", trained), trained.X)


def test_new_rows_without_the_target_with_extra_columns_in_another_order(tmp_path, trained):
    path = _file(tmp_path, "note,zip,flag,colour,size\nhi,2,true,green,7\nho,10,,red,\n", "new.csv")
    X = _quiet(load_features, path, trained.schema())
    np.testing.assert_array_equal(X, [[7.0, 1.0, 1.0, 2.0], [np.nan, 2.0, np.nan, 3.0]])


def test_an_unseen_category_is_missing_with_a_warning(tmp_path, trained):
    path = _file(tmp_path, "size,colour,flag,zip\n1,purple,True,1\n2,red,False,99\n3,purple,True,2\n", "new.csv")
    with pytest.warns(DataWarning) as caught:
        X = load_features(path, trained.schema())
    assert [str(w.message) for w in caught if issubclass(w.category, DataWarning)] == [
        f"{path}: column 'colour' has 2 value(s) not in the training data's vocabulary ('purple'): read as missing (NaN)",
        f"{path}: column 'zip' has 1 value(s) not in the training data's vocabulary ('99'): read as missing (NaN)",
    ]
    np.testing.assert_array_equal(X[:, 1], [np.nan, 2.0, np.nan])
    np.testing.assert_array_equal(X[:, 3], [0.0, np.nan, 2.0])


def test_an_unseen_category_of_a_capped_column_is_other(tmp_path):
    labels = [f"c{k:03d}" for k in range(20)]
    train = _file(tmp_path, "code,y\n" + "".join(f"{label},{i}.5\n" for i, label in enumerate(labels)), "t.csv")
    with pytest.warns(DataWarning, match="more than the cap of 5"):
        dataset = load_dataset(DataRef(path=str(train), target="y", max_categories=5))
    assert dataset.categories["code"] == ("c000", "c001", "c002", "c003", OTHER_CATEGORY)
    new = _file(tmp_path, "code\nc001\nc019\nnever\n\n", "new.csv")
    with pytest.warns(DataWarning, match=r"column 'code' has 2 value\(s\) not in the training data's vocabulary "
                                         r"\('c019', 'never'\): read as the category '\(other\)'"):
        X = load_features(new, dataset.schema())
    assert X[:, 0].tolist() == [1.0, 4.0, 4.0]  # c019, rare in training, was (other) there too


def test_missing_feature_columns_are_one_error_naming_them_all(tmp_path, trained):
    path = _file(tmp_path, "colour,y\nred,a\n", "new.csv")
    with pytest.raises(DataError) as excinfo:
        load_features(path, trained.schema())
    assert str(excinfo.value) == (f"{path}: missing column(s) 'size', 'flag', 'zip': the model expects the features "
                                  "'size', 'colour', 'flag', 'zip'")


def test_text_in_a_numeric_column_names_the_column_and_its_first_rows(tmp_path, trained):
    path = _file(tmp_path, "size,colour,flag,zip\n1,red,True,1\nbig,red,True,1\n3,red,True,1\nhuge,red,True,1\n"
                 "inf,red,True,1\n", "new.csv")
    with pytest.raises(DataError) as excinfo:
        load_features(path, trained.schema())
    assert str(excinfo.value) == (f"{path}: column 'size' is not numeric: data row 2 holds 'big', data row 4 holds "
                                  "'huge': the model expects numbers in it (an empty cell for a missing value)")
    path.write_text("size,colour,flag,zip\n1,red,True,1\ninf,red,True,1\n")
    with pytest.raises(DataError, match=r"column 'size' has a non-finite value \(inf\) at data row 2"):
        load_features(path, trained.schema())


def test_every_problem_of_new_rows_at_once(tmp_path, trained):
    path = tmp_path / "new.json"
    path.write_text(json.dumps([{"size": "1", "colour": "red", "flag": [True], "zip": 1},
                                {"size": 2, "colour": "red", "flag": True, "zip": 1}]))
    with pytest.raises(DataError) as excinfo:
        load_features(path, trained.schema())
    assert str(excinfo.value).split("\n") == [
        f"{path}: column 'size' is not numeric: record 1 holds \"1\": the model expects numbers in it (an empty "
        "cell for a missing value)",
        f"{path}: column 'flag' holds values that are no number, text or boolean: record 1 holds [true]: expected a "
        "number, text, a boolean or null in each cell",
    ]


def test_typed_new_rows_for_a_model_trained_on_a_csv(tmp_path, trained):
    # parquet's 2.0 finds a CSV's "2" (1.0 finds "1.0", which this CSV also has); booleans find "False"/"True".
    path = tmp_path / "new.parquet"
    pq.write_table(pa.table({"size": [1, None], "colour": ["blue", None], "flag": [False, True],
                             "zip": [1.0, 2.0]}), path)
    X = _quiet(load_features, path, trained.schema())
    np.testing.assert_array_equal(X, [[1.0, 0.0, 0.0, 1.0], [np.nan, np.nan, 1.0, 2.0]])
    pq.write_table(pa.table({"size": [1.0], "colour": ["red"], "flag": [True], "zip": pa.array([10], pa.int32())}),
                   path)
    np.testing.assert_array_equal(_quiet(load_features, path, trained.schema()), [[1.0, 2.0, 1.0, 3.0]])


def test_encode_rows_in_memory(trained):
    X = _quiet(encode_rows, trained, {"size": np.array([3.0, np.nan]), "colour": ["red", None],
                                      "flag": [True, False], "zip": ["10", 1]})
    np.testing.assert_array_equal(X, [[3.0, 2.0, 1.0, 3.0], [np.nan, np.nan, 0.0, 0.0]])
    X = _quiet(encode_rows, trained.schema(), {"size": ["3", "NA"], "colour": ["red", ""], "flag": ["true", "False"],
                                               "zip": ["1.0", "2"]}, text=True)
    np.testing.assert_array_equal(X, [[3.0, 2.0, 1.0, 1.0], [np.nan, np.nan, 0.0, 2.0]])
    with pytest.raises(DataError, match=r"^rows: missing column\(s\) 'zip'"):
        encode_rows(trained, {"size": [1.0], "colour": ["red"], "flag": [True]})
    with pytest.raises(DataError, match=r"^rows: column 'size' is not numeric: row 1 holds \"x\""):
        encode_rows(trained, {"size": ["x"], "colour": ["red"], "flag": [True], "zip": [1]})


def test_npz_new_rows(tmp_path):
    train = tmp_path / "t.npz"
    np.savez(train, X=np.array([[1.0, 5.0], [2.0, np.nan], [3.0, 7.0]]), y=np.array([0.5, 1.5, 2.5]))
    dataset = load_dataset(DataRef(path=str(train)))
    new = tmp_path / "new.npz"
    np.savez(new, X=np.array([[4.0, 8.0]]), y=np.array([0.0]))
    assert load_features(new, dataset.schema()).tolist() == [[4.0, 8.0]]
    np.savez(new, X=np.array([[4.0]]), y=np.array([0.0]))
    with pytest.raises(DataError, match=r"missing column\(s\) 'x1'"):
        load_features(new, dataset.schema())
