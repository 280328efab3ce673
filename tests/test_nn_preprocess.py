"""The NN's preprocessing (nn_batch/preprocess.py, device_data.py): fitted on a fold's training rows only
(medians, missing indicators, one-hot vocabularies with an "other" slot, z-score), applied to all its
rows, JSON round-tripped exactly; a clean dataset keeps its one whole-dataset z-score, bit for bit."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from nn_cases import DATA
from nn_task_cases import table_ref

from watcher_plugins.data import Dataset, kfold_splits, load_dataset
from watcher_plugins.nn_batch.device_data import (
    DeviceDataset,
    DeviceDatasetCache,
    fold_preprocessing,
    full_preprocessing,
)
from watcher_plugins.nn_batch.preprocess import Preprocessing, missing_columns, standardise

CPU = torch.device("cpu")
FOLDS, SEED = 3, 11
X1, X2, COLOUR = 1, 2, 4  # columns of nn_task_cases' table: x1 and x2 have missing cells, colour is text


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    ref = table_ref(tmp_path_factory.mktemp("preprocess"), "regression")
    return ref, load_dataset(ref)


def test_a_clean_dataset_keeps_its_one_whole_dataset_z_score():
    cache = DeviceDatasetCache(CPU)
    whole = cache.get(DATA)
    assert all(cache.for_fold(DATA, FOLDS, SEED, k) is whole for k in range(FOLDS))
    dataset = load_dataset(DATA)
    assert torch.equal(whole.X, torch.from_numpy(standardise(dataset.X)[0]))
    # the preprocessing of every row (what a refit saves) is that z-score too, bit for bit
    full = full_preprocessing(dataset)
    assert full.indicators == () and full.categorical == () and full.n_inputs == dataset.X.shape[1]
    assert np.array_equal(full.transform(dataset.X), standardise(dataset.X)[0])


def test_a_table_with_missing_values_and_categories_gets_a_dataset_per_fold(table):
    ref, dataset = table
    cache = DeviceDatasetCache(CPU)
    per_fold = [cache.for_fold(ref, FOLDS, SEED, k) for k in range(FOLDS)]
    assert len({id(d) for d in per_fold}) == FOLDS and len({d.key for d in per_fold}) == FOLDS
    assert cache.for_fold(ref, FOLDS, SEED, 1) is per_fold[1]  # cached
    for k, data in enumerate(per_fold):
        want = fold_preprocessing(dataset, FOLDS, SEED, k)
        assert data.preprocessing == want and data.fitted_for == (FOLDS, SEED, k)
        assert torch.equal(data.X, torch.from_numpy(want.transform(dataset.X)))
        # the inputs: x0, x1, x2, x3 (imputed), the indicators of x1 and x2, colour's 4 categories + other
        assert data.n_features == 4 + 2 + 5
        with pytest.raises(ValueError, match="preprocessed for fold"):
            data.fold(FOLDS, SEED, (k + 1) % FOLDS)
    with pytest.raises(Exception, match="preprocessed per fold"):
        cache.get(ref)


def test_the_statistics_come_from_the_training_rows_only(table):
    """The leakage test: the held-out rows of fold 0 made extreme (values of 1e6, a category the training
    rows never have, a missing colour) change none of the medians, vocabularies, means and standard
    deviations fold 0 uses, nor any training row's inputs; they equal a fit on the training rows alone.
    The guard: the same statistics of every row do change."""
    _, dataset = table
    train, held_out = kfold_splits(dataset.n_rows, FOLDS, SEED)[0]
    X = dataset.X.copy()
    numeric = [0, 1, 2, 3]
    for j in numeric:
        seen = ~np.isnan(X[held_out, j])
        X[held_out[seen], j] = 1e6 * (1 + j)  # the missing cells stay missing: the indicators' layout stands
    X[held_out[::2], COLOUR] = 4.0  # a fifth category, only in held-out rows
    X[held_out[1::2], COLOUR] = np.nan
    categories = {**dataset.categories, "colour": (*dataset.categories["colour"], "zzz-new")}
    tampered = dataclasses.replace(dataset, X=X, categories=categories)

    clean_fit = fold_preprocessing(dataset, FOLDS, SEED, 0)
    tampered_fit = fold_preprocessing(tampered, FOLDS, SEED, 0)
    categorical = dataset.categorical_columns
    alone = Preprocessing.fit(dataset.X[train], categorical, missing_columns(dataset.X, categorical))
    assert tampered_fit == clean_fit == alone
    assert clean_fit.vocabularies == ((0, 1, 2, 3),)
    assert clean_fit.medians == tuple(float(np.nanmedian(dataset.X[train, j])) for j in numeric)
    a = DeviceDataset.from_dataset("a", dataset, CPU, clean_fit)
    b = DeviceDataset.from_dataset("b", tampered, CPU, tampered_fit)
    assert torch.equal(a.X[torch.from_numpy(train)], b.X[torch.from_numpy(train)])
    # the unseen category and the missing colour land in "other", the last input column, before the z-score
    design = tampered_fit.design(X[held_out])
    assert np.all(design[:, -1] == 1.0) and np.all(design[:, -5:-1] == 0.0)
    # the guard: fitted on every row, the tampered table's statistics are not the training rows'
    every = Preprocessing.fit(X, categorical, missing_columns(X, categorical))
    assert every.medians != clean_fit.medians and every.mean != clean_fit.mean
    assert every.vocabularies == ((0, 1, 2, 3, 4),)


def test_a_category_absent_from_the_training_rows_is_other(table):
    _, dataset = table
    train, held_out = kfold_splits(dataset.n_rows, FOLDS, SEED)[2]
    X = dataset.X.copy()
    violet = 3.0
    X[train[X[train, COLOUR] == violet], COLOUR] = 0.0  # violet only among the held-out rows now
    X[held_out[:3], COLOUR] = violet
    fitted = fold_preprocessing(dataclasses.replace(dataset, X=X), FOLDS, SEED, 2)
    assert fitted.vocabularies == ((0, 1, 2),)
    design = fitted.design(X[held_out[:3]])
    assert np.all(design[:, -1] == 1.0) and np.all(design[:, -4:-1] == 0.0)


def test_missing_values_are_imputed_by_the_training_median_with_an_indicator(table):
    _, dataset = table
    fitted = fold_preprocessing(dataset, FOLDS, SEED, 1)
    assert fitted.indicators == (X1, X2)  # the columns with a missing cell anywhere in the table
    design = fitted.design(dataset.X)
    missing = np.isnan(dataset.X[:, X1])
    assert missing.sum() > 10
    assert np.all(design[missing, X1] == fitted.medians[X1]) and np.array_equal(design[~missing, X1], dataset.X[~missing, X1])
    assert np.array_equal(design[:, 4], missing.astype(float))  # x1's indicator
    # a fold whose training rows have no missing x2 still has x2's indicator (the same inputs in every fold)
    X = dataset.X.copy()
    train, _ = kfold_splits(dataset.n_rows, FOLDS, SEED)[1]
    X[train, X2] = np.nan_to_num(X[train, X2])
    assert fold_preprocessing(dataclasses.replace(dataset, X=X), FOLDS, SEED, 1).indicators == (X1, X2)


def test_the_preprocessing_round_trips_through_json_to_the_same_bits(table):
    _, dataset = table
    fitted = full_preprocessing(dataset)
    back = Preprocessing.from_json(json.loads(json.dumps(fitted.to_json())))
    assert back == fitted
    assert np.array_equal(back.transform(dataset.X), fitted.transform(dataset.X))
    names = fitted.input_names(dataset.feature_names)
    assert names[:6] == ["x0", "x1", "x2", "x3", "x1 missing", "x2 missing"] and names[-1] == "colour=other"
    with pytest.raises(ValueError, match="lengths"):
        Preprocessing.from_json({**fitted.to_json(), "mean": [0.0]})
    with pytest.raises(ValueError, match="encoded columns"):
        fitted.transform(dataset.X[:, :3])


def test_a_column_with_no_value_in_the_training_rows_is_imputed_by_zero():
    X = np.array([[np.nan, 1.0], [np.nan, 2.0], [3.0, np.nan]])
    fitted = Preprocessing.fit(X[:2], indicators=missing_columns(X))
    assert fitted.medians == (0.0, 1.5) and fitted.indicators == (0, 1)
    assert np.isfinite(fitted.transform(X)).all()


def test_a_dataset_keeps_its_target_in_float64(tmp_path):
    # nn_task_cases' regression target is offset by 2e7: as float32 its values would be 2-unit steps
    ref = table_ref(tmp_path, "regression")
    dataset = load_dataset(ref)
    data = DeviceDatasetCache(CPU).for_fold(ref, FOLDS, SEED, 0)
    assert data.y_host.dtype == np.float64 and np.array_equal(data.y_host, dataset.y)
    assert abs(data.y_mean - 2e7) < 10 and data.y.dtype == torch.float32 and abs(float(data.y.mean())) < 1e-5
    categorical = Dataset("c", np.zeros((4, 1)), np.array([0.0, 1.0, 2.0, 1.0]), ("x",), task="multiclass",
                          classes=("a", "b", "c"))
    coded = DeviceDataset.from_dataset("c", categorical, CPU)
    assert (coded.y_mean, coded.y_std, coded.n_outputs) == (0.0, 1.0, 3)
    assert coded.y_codes is not None and coded.y_codes.tolist() == [0, 1, 2, 1]
