"""The example plugin (plugins/watcher-ridge) as a user installs it: a separate package, found through
its ``watcher`` entry point, whose model type reaches the leaderboard, the report and summary.json with
no change to the core. tox installs it into the unit env (`pip install -e plugins/watcher-ridge`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# The plugin is imported in the tests, not here: the envs that deselect these tests (kernels, trees) do not
# install it. tox's unit env does; elsewhere: pip install plugins/watcher-ridge.
from watcher_plugins.manager import BLOCK_ENV, WatcherPluginManager


def test_the_plugin_is_found_through_its_entry_point(monkeypatch):
    import watcher_ridge.plugin

    monkeypatch.delenv(BLOCK_ENV, raising=False)
    pm = WatcherPluginManager()
    pm.load_plugins()
    assert pm.get_plugin("ridge") is watcher_ridge.plugin
    assert pm.get_executors()["ridge"].model_types == ("ridge",)
    assert pm.get_model_types()["ridge"].seed_offset == 100


def test_blocking_plugins_leaves_ridge_out(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "ridge")
    pm = WatcherPluginManager()
    pm.load_plugins()
    assert "ridge" not in pm.get_model_types()


def agent(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != BLOCK_ENV}
    return subprocess.run([sys.executable, "-m", "watcher_plugins.agent", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_ridge_reaches_the_leaderboard_report_and_summary(tmp_path):
    params = {"model_types": ["ridge"], "trials": 5, "output_dir": "out", "progress": False, "devices": "cpu",
              "data": {"embedded": "survivors", "rows": 1000}}
    run = agent(["--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params)], tmp_path)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["leaderboard"]
    assert row["model_type"] == "ridge" and row["executor"] == "ridge" and row["trials_complete"] == 5
    assert set(row["best_params"]) == {"alpha", "l1_ratio"}
    assert summary["params"]["ridge_max_iter"] == 5000  # the plugin's schema default
    lines = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    best = [line["r2"] for line in lines if line["trial_number"] == row["best_trial"]]
    assert len(lines) == 15 and row["best_score"] == pytest.approx(sum(best) / 3, abs=1e-12)
    assert 0.2 < row["best_score"] < 1.0  # a linear model explains part of the survivors target, not all
    assert "ridge" in run.stdout.split("compare_models leaderboard")[1]
    report = (out / "report.html").read_text()
    assert "<td>ridge</td><td>ridge</td>" in report  # its leaderboard row: model type, executor
    assert report.count("<h3>ridge</h3>") == 2  # its optimisation history and its param importances


def test_a_bad_ridge_param_is_bad_input_naming_it(tmp_path):
    run = agent(["--run-pipeline", "--start-step", "5", "--end-step", "5", "--params",
                 json.dumps({"model_types": ["ridge"], "ridge_max_iter": 0, "output_dir": "out"})], tmp_path)
    assert run.returncode == 2
    assert "--params::$.ridge_max_iter: 0 is less than the minimum of 1" in run.stderr
    assert not (tmp_path / "out").exists()


def test_standardising_uses_the_training_rows_only():
    from watcher_ridge.executor import fit_fold

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 5)), rng.normal(size=300)
    X_val = rng.normal(size=(50, 5))
    params = {"alpha": 0.1, "l1_ratio": 0.5}
    first, _ = fit_fold(X, y, X_val, params, 5000)
    shifted = X_val.copy()
    shifted[1:] += 100.0  # other held-out rows, far off: a held-out row's prediction must not move
    again, _ = fit_fold(X, y, shifted, params, 5000)
    assert first[0] == again[0]


# --- #20: missing values, categories, classification, refit and predict -------------------------------

#: Today's fold R² of three trials on the embedded data (600 rows, 3 folds, seed 42), taken before the
#: plugin learned missing values and categories: on a clean numeric dataset the numbers must not move.
TODAYS_FOLD_R2 = {
    (0.5, 0.0): [0.27080519594283514, 0.12207769795098344, 0.23647653163194837],
    (0.01, 0.5): [0.2902040544693597, 0.14842185142257702, 0.26156115061067675],
    (3.0, 1.0): [-0.0005670992951087861, -0.013276090278484087, -0.006580051570479251],
}


def ridge_executor(tmp_path):
    from watcher_ridge.executor import RidgeExecutor

    from watcher_plugins.executor import RunContext

    return RidgeExecutor({"ridge_max_iter": 5000}, RunContext(output_dir=tmp_path, devices=[]))


def write_table(path, task: str, rows: int = 240, seed: int = 0, extreme_row: int | None = None):
    """A user's CSV with what #20 is about: empty cells and NA markers in numeric columns, a text column
    with empty cells, a True/False column, and a target: a number (regression), yes/no (binary) or
    a/b/c (multiclass) that depends on every feature. ``extreme_row`` (counted from 0) holds 1e12 in x1
    and a category no other row holds."""
    import csv

    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    flag = rng.random(rows) < 0.4
    signal = 1.5 * x1 - x2 + np.where(colour == "red", 1.0, np.where(colour == "green", -0.5, 0.0)) + 0.8 * flag
    if task == "regression":
        target = [repr(float(v)) for v in signal + 0.3 * rng.normal(size=rows)]
    elif task == "binary":
        target = np.where(rng.random(rows) < 1 / (1 + np.exp(-2 * signal)), "yes", "no").tolist()
    else:
        noisy = signal + 0.5 * rng.normal(size=rows)
        target = np.where(noisy < -0.5, "a", np.where(noisy < 0.8, "b", "c")).tolist()
    missing1, missing2, missing_colour = rng.random(rows) < 0.1, rng.random(rows) < 0.05, rng.random(rows) < 0.05
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x1", "x2", "colour", "flag", "target"])
        for i in range(rows):
            cells = ["" if missing1[i] else repr(float(x1[i])), "NA" if missing2[i] else repr(float(x2[i])),
                     "" if missing_colour[i] else str(colour[i]), str(bool(flag[i])), target[i]]
            if i == extreme_row:
                cells[0], cells[2] = "1e12", "zzz-only-here"
            writer.writerow(cells)
    return path


def trial(path, task: str, params: dict, metric: str, number: int = 0):
    from watcher_plugins.records import DataRef, TrialJob

    return TrialJob("ridge", number, params, DataRef(path=str(path), target="target"), folds=3, seed=42,
                    metric=metric)


def test_a_clean_numeric_dataset_gives_todays_numbers(tmp_path):
    from watcher_plugins.records import DataRef, TrialJob

    executor = ridge_executor(tmp_path)
    for number, ((alpha, l1_ratio), expected) in enumerate(TODAYS_FOLD_R2.items()):
        job = TrialJob("ridge", number, {"alpha": alpha, "l1_ratio": l1_ratio}, DataRef(embedded="survivors", rows=600),
                       folds=3, seed=42)
        assert [r.score for r in executor.run_batch([job])] == expected  # exactly


def test_the_model_type_declares_every_task_metric_and_its_predict(monkeypatch):
    import watcher_ridge.plugin

    from watcher_plugins.tasks import METRICS, TASKS

    monkeypatch.delenv(BLOCK_ENV, raising=False)
    pm = WatcherPluginManager()
    pm.load_plugins()
    ridge = pm.get_model_types()["ridge"]
    assert ridge.tasks == TASKS and set(ridge.metrics) == set(METRICS) == {
        "r2", "rmse", "mae", "logloss", "auc", "accuracy"}
    assert ridge.predict is watcher_ridge.plugin.predict_ridge


@pytest.mark.parametrize("task, metric, params, better_than", [
    ("regression", "rmse", {"alpha": 0.1, "l1_ratio": 0.0}, None),
    ("regression", "r2", {"alpha": 0.01, "l1_ratio": 0.5}, None),
    ("binary", "logloss", {"alpha": 0.1, "l1_ratio": 0.0}, None),
    ("binary", "auc", {"alpha": 0.1, "l1_ratio": 0.5}, 0.8),
    ("multiclass", "accuracy", {"alpha": 0.1, "l1_ratio": 0.0}, 0.6),
    ("multiclass", "logloss", {"alpha": 0.3, "l1_ratio": 0.25}, None),
])
def test_missing_values_categories_and_classes_are_learned(tmp_path, task, metric, params, better_than):
    from watcher_plugins.data import load_dataset

    path = write_table(tmp_path / "t.csv", task)
    job = trial(path, task, params, metric)
    results = ridge_executor(tmp_path).run_batch([job])
    assert [r.status for r in results] == ["ok"] * 3, [r.error for r in results]
    dataset = load_dataset(job.data)
    assert dataset.task == task and np.isnan(dataset.X).any() and dataset.categorical_columns == (2, 3)
    assert all(np.isfinite(r.score) for r in results)
    if better_than is not None:
        assert min(r.score for r in results) > better_than
    if metric == "logloss":  # well below the log loss of the classes' shares
        shares = np.bincount(dataset.y.astype(int)) / dataset.n_rows
        baseline = float(-np.sum(shares * np.log(shares)))
        assert np.mean([r.score for r in results]) < 0.8 * baseline
    if metric == "r2":
        assert min(r.score for r in results) > 0.7  # the missing cells cost some


@pytest.mark.parametrize("task, metric, params", [
    ("regression", "r2", {"alpha": 0.05, "l1_ratio": 0.0}),
    ("regression", "mae", {"alpha": 0.01, "l1_ratio": 0.75}),
    ("binary", "logloss", {"alpha": 0.1, "l1_ratio": 0.0}),
    ("binary", "accuracy", {"alpha": 0.1, "l1_ratio": 0.5}),
    ("multiclass", "logloss", {"alpha": 0.1, "l1_ratio": 0.0}),
    ("multiclass", "auc", {"alpha": 0.2, "l1_ratio": 1.0}),
])
def test_refit_gives_the_study_fold_scores_and_predict_gives_its_predictions(tmp_path, task, metric, params):
    from watcher_ridge.executor import RidgeExecutor
    from watcher_ridge.model import MODEL_FILE
    from watcher_ridge.plugin import predict_ridge

    from watcher_plugins.data import kfold_splits, load_dataset
    from watcher_plugins.records import RefitJob
    from watcher_plugins.tasks import score

    path = write_table(tmp_path / "t.csv", task, seed=3)
    job = trial(path, task, params, metric, number=7)
    study = [r.score for r in ridge_executor(tmp_path).run_batch([job])]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (result,) = RidgeExecutor({"ridge_max_iter": 5000}, ridge_executor(tmp_path).context).refit(
        [RefitJob(job, str(model_dir))])
    assert result.status == "ok", result.error
    assert (result.model_type, result.trial_number, result.files) == ("ridge", 7, [MODEL_FILE])
    assert result.fold_scores == study  # exactly: the same folds, seeds and code
    dataset = load_dataset(job.data)
    oof = np.asarray(result.oof)
    assert oof.shape == ((dataset.n_rows, 3) if task == "multiclass" else (dataset.n_rows,))
    for k, (_, val) in enumerate(kfold_splits(dataset.n_rows, 3, 42)):
        assert score(metric, task, dataset.y[val], oof[val]) == study[k]
    # The saved model: JSON, no pickle; predict recomputes the in-process predictions bit for bit.
    saved = json.loads((model_dir / MODEL_FILE).read_text())
    assert saved["task"] == task and saved["format_version"] == 1
    assert sorted(p.name for p in model_dir.iterdir()) == [MODEL_FILE]
    predicted = predict_ridge(model_dir, dataset.X.copy())
    assert predicted.tolist() == result.predictions
    assert np.asarray(result.predictions).shape == oof.shape
    if task != "regression":
        probabilities = np.asarray(result.predictions)
        assert np.all((probabilities >= 0) & (probabilities <= 1))
        if task == "multiclass":
            assert np.allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    # the fit on every row does about as well as the held-out folds, on the rows it saw
    assert score(metric, task, dataset.y, np.asarray(result.predictions)) == pytest.approx(
        float(np.mean(study)), rel=0.25, abs=0.05)


def test_the_saved_numbers_round_trip_exactly(tmp_path):
    from watcher_ridge.executor import fit_model
    from watcher_ridge.model import load_model

    from watcher_plugins.data import load_dataset
    from watcher_plugins.records import DataRef

    dataset = load_dataset(DataRef(path=str(write_table(tmp_path / "t.csv", "multiclass")), target="target"))
    model, _ = fit_model(dataset.X, dataset.y, {"alpha": 0.1, "l1_ratio": 0.0}, 5000, task="multiclass",
                         n_classes=3, categorical=dataset.categorical_columns, feature_names=dataset.feature_names,
                         categories=dataset.categories)
    model.save(tmp_path)
    again = load_model(tmp_path)
    for name in ("mean", "scale"):
        assert getattr(again.preprocessing, name).tobytes() == getattr(model.preprocessing, name).tobytes()
    assert again.coef.tobytes() == model.coef.tobytes() and again.intercept.tobytes() == model.intercept.tobytes()
    assert again.preprocessing.features == model.preprocessing.features
    assert again.preprocessing.column_names[:4] == ("x1", "x1 (missing)", "x2", "x2 (missing)")
    assert again.preprocessing.column_names[4:] == ("colour=blue", "colour=green", "colour=red", "colour (other)",
                                                    "flag=False", "flag=True", "flag (other)")


def test_preprocessing_imputes_one_hot_encodes_and_maps_the_unseen_to_other():
    from watcher_ridge.model import fit_preprocessing

    nan = np.nan
    X_train = np.array([[1.0, 0.0], [nan, 2.0], [3.0, 0.0], [5.0, nan]])
    prep = fit_preprocessing(X_train, categorical=[1], feature_names=["x", "c"], categories={"c": ("p", "q", "r")})
    assert prep.column_names == ("x", "x (missing)", "c=p", "c=r", "c (other)")  # q is not in the training rows
    new = np.array([[nan, 1.0], [7.0, 2.0], [nan, nan]])
    assert prep.design(new).tolist() == [[3.0, 1.0, 0.0, 0.0, 1.0],  # median 3; q unseen: other
                                         [7.0, 0.0, 0.0, 1.0, 0.0],
                                         [3.0, 1.0, 0.0, 0.0, 1.0]]  # missing: other


def test_imputation_and_encoding_statistics_come_from_the_training_rows_only(tmp_path):
    """A held-out row with an extreme value (1e12) and a category of its own moves no statistic of the fold
    that holds it out: the other held-out rows' predictions stay the same to the bit. Fitting the median,
    the vocabulary or the standardisation on every row would move them."""
    from watcher_ridge.executor import RidgeExecutor, fit_fold

    from watcher_plugins.data import kfold_splits, load_dataset
    from watcher_plugins.records import RefitJob

    extreme = 5
    clean = trial(write_table(tmp_path / "clean.csv", "binary", seed=1), "binary", {"alpha": 0.1, "l1_ratio": 0.0},
                  "logloss")
    dirty = trial(write_table(tmp_path / "dirty.csv", "binary", seed=1, extreme_row=extreme), "binary",
                  {"alpha": 0.1, "l1_ratio": 0.0}, "logloss")
    executor = RidgeExecutor({"ridge_max_iter": 5000}, ridge_executor(tmp_path).context)
    oofs = []
    for job, name in ((clean, "clean"), (dirty, "dirty")):
        (tmp_path / name).mkdir()
        (result,) = executor.refit([RefitJob(job, str(tmp_path / name))])
        assert result.status == "ok", result.error
        oofs.append(np.asarray(result.oof))
    dataset = load_dataset(dirty.data)
    assert dataset.X[extreme, 0] == 1e12 and dataset.categories["colour"][-1] == "zzz-only-here"
    (fold,) = [k for k, (_, val) in enumerate(kfold_splits(dataset.n_rows, 3, 42)) if extreme in val]
    train, val = kfold_splits(dataset.n_rows, 3, 42)[fold]
    others = val[val != extreme]
    assert oofs[0][others].tolist() == oofs[1][others].tolist()
    # ... and the fold's own fit: the held-out rows change nothing of its numbers.
    X, y = dataset.X, dataset.y
    kwargs = {"task": "binary", "n_classes": 2, "categorical": dataset.categorical_columns}
    first, _ = fit_fold(X[train], y[train], X[val], {"alpha": 0.1, "l1_ratio": 0.0}, 5000, **kwargs)
    shifted = X[val].copy()
    shifted[1:, 0] = 1e9  # every other held-out row far off
    again, _ = fit_fold(X[train], y[train], shifted, {"alpha": 0.1, "l1_ratio": 0.0}, 5000, **kwargs)
    assert first[0] == again[0]
