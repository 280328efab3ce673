"""The tree libraries on users' tables, on the CPU: missing values and categories handled natively,
binary and 3-class targets scored by the run's metric of the held-out probabilities, a large target offset
that float32 alone would round away, and the refit: out-of-fold predictions whose fold scores are the
study's, a model saved in the library's own format whose predictions saved.predict gives again bit for bit.

The tables are CSV files the tests write (empty cells, a text column), read as a user's file is."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from watcher_plugins import tasks
from watcher_plugins.builtin import TREES
from watcher_plugins.data import DataWarning, embedded_survivors, kfold_splits, load_dataset, load_features
from watcher_plugins.executor import RunContext
from watcher_plugins.records import DataRef, RefitJob, TrialJob
from watcher_plugins.tree_parallel import libraries, saved
from watcher_plugins.tree_parallel.encoding import TreeEncoding, exact_in_float32
from watcher_plugins.tree_parallel.executor import TreeParallelExecutor
from watcher_plugins.tree_parallel.libraries import FitSettings, eval_metric
from watcher_plugins.tree_parallel.trial import FoldDataCache, run_trial

MODEL_TYPES = ("catboost", "lightgbm", "xgboost")
SETTINGS = FitSettings(rounds=40, early_stopping_rounds=10, threads=1)
FAST = {"tree_rounds": 40, "tree_early_stopping_rounds": 10}
COLOURS = ("red", "green", "blue", "grey")
PARAMS = {"catboost": {"depth": 4}, "lightgbm": {"num_leaves": 15, "min_child_samples": 10},
          "xgboost": {"max_depth": 4}}


@pytest.fixture(autouse=True)
def trees():
    for lib in MODEL_TYPES:
        pytest.importorskip(lib)


def _write_table(path: Path, task: str, rows: int = 900, seed: int = 0, offset: float = 0.0) -> DataRef:
    """A CSV of two numeric features (x1 with empty cells), a text column (colour, some empty) and a target:
    regression values (plus ``offset``), "no"/"yes", or "a"/"b"/"c"; the colour carries much of the signal."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.standard_normal(rows), rng.uniform(-1.0, 1.0, rows)
    colour = rng.choice(COLOURS, rows)
    x1_missing, colour_missing = rng.random(rows) < 0.15, rng.random(rows) < 0.1
    effect = np.select([colour == "red", colour == "blue"], [1.5, -1.0], 0.0) * ~colour_missing
    signal = np.where(x1_missing, 1.0, x1) + effect + 0.5 * x2
    if task == "regression":
        target = [repr(float(v)) for v in signal + 0.3 * rng.standard_normal(rows) + offset]
    elif task == "binary":
        target = np.where(signal + 0.5 * rng.standard_normal(rows) > 0.3, "yes", "no").tolist()
    else:
        target = np.array(["a", "b", "c"])[np.digitize(signal + 0.5 * rng.standard_normal(rows), [-0.3, 0.8])].tolist()
    lines = ["x1,x2,colour,target"]
    for i in range(rows):
        lines.append(",".join(["" if x1_missing[i] else repr(float(x1[i])), repr(float(x2[i])),
                               "" if colour_missing[i] else str(colour[i]), target[i]]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DataRef(path=str(path), target="target")


def _job(model_type: str, ref: DataRef, metric: str, trial: int = 0, folds: int = 3) -> TrialJob:
    return TrialJob(model_type, trial, dict(PARAMS[model_type]), ref, folds, seed=5, metric=metric)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_missing_values_and_categories_reach_each_library_natively(tmp_path, model_type):
    ref = _write_table(tmp_path / "t.csv", "regression")
    ds = load_dataset(ref)
    assert ds.categorical_columns == (2,) and np.isnan(ds.X[:, 0]).any() and np.isnan(ds.X[:, 2]).any()
    cache = FoldDataCache()
    results = run_trial(_job(model_type, ref, "r2"), SETTINGS, cache)
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert all(r.score > 0.6 for r in results)  # the colour's effect is learned (x1 and x2 alone: < 0.5)
    fold = cache.fold(_job(model_type, ref, "r2"), 0, SETTINGS)
    assert np.isnan(fold.X_val[:, 0]).any() and np.isnan(fold.X_val[:, 2]).any()  # NaN stays NaN
    train, _ = fold.prepared
    if model_type == "catboost":
        assert train.get_cat_feature_indices() == [2]
        assert set(libraries.CatBoostFitter().features(fold.X_val, fold.tree_encoding).cat_feature_data[:, 0]) \
            == {b"0", b"1", b"2", b"3", b"-1"}  # codes as strings, missing as a category of its own
    elif model_type == "lightgbm":
        assert train.categorical_feature == [2]
    else:
        assert train.feature_types == ["q", "q", "c"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("task, metric", [("binary", "logloss"), ("binary", "auc"), ("binary", "accuracy"),
                                          ("multiclass", "logloss"), ("multiclass", "auc"),
                                          ("multiclass", "accuracy")])
def test_class_targets_are_scored_by_the_runs_metric_of_the_held_out_probabilities(tmp_path, model_type, task,
                                                                                    metric):
    ref = _write_table(tmp_path / "t.csv", task)
    ds = load_dataset(ref)
    assert ds.task == task and len(ds.classes) == (2 if task == "binary" else 3)
    held_out: dict[int, np.ndarray] = {}
    results = run_trial(_job(model_type, ref, metric), SETTINGS, FoldDataCache(), held_out=held_out)
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    for r, (_, val) in zip(results, kfold_splits(ds.n_rows, 3, 5)):
        p = held_out[r.fold_idx]
        assert p.dtype == np.float64 and p.shape == ((len(val),) if task == "binary" else (len(val), 3))
        assert ((p >= 0) & (p <= 1)).all()
        if task == "multiclass":
            assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
        assert r.score == tasks.score(metric, task, ds.y[val], p)  # exactly
    # Well above chance: log loss below 85% of a uniform guess's, AUC above 0.75, accuracy above 0.6.
    uniform = np.log(len(ds.classes))
    better = {"logloss": lambda s: s < 0.85 * uniform, "auc": lambda s: s > 0.75, "accuracy": lambda s: s > 0.6}[metric]
    assert all(better(r.score) for r in results), [r.score for r in results]


def test_early_stopping_watches_the_libraries_metric_closest_to_the_runs():
    assert [eval_metric(m, "regression", "r2") for m in MODEL_TYPES] == [None, "l2", "rmse"]  # as before
    assert [eval_metric(m, "regression", "mae") for m in MODEL_TYPES] == ["MAE", "l1", "mae"]
    assert [eval_metric(m, "binary", "auc") for m in MODEL_TYPES] == ["AUC", "auc", "auc"]
    assert [eval_metric(m, "multiclass", "accuracy") for m in MODEL_TYPES] == ["Accuracy", "multi_error", "merror"]
    with pytest.raises(ValueError, match="does not score a binary task"):
        eval_metric("xgboost", "binary", "r2")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_target_offset_by_2e7_keeps_its_r2(tmp_path, model_type):
    # y + 2e7 in float32 keeps a handful of distinct values; z-scored in float64 first, it keeps its detail.
    plain_ref = _write_table(tmp_path / "y.csv", "regression", rows=4000, seed=3)
    offset_ref = _write_table(tmp_path / "y_offset.csv", "regression", rows=4000, seed=3, offset=2e7)
    offset = load_dataset(offset_ref)
    assert len(np.unique(offset.y.astype(np.float32))) < 20
    assert TreeEncoding.of(offset).target_scaling is not None
    scores = {ref.path: [r.score for r in run_trial(_job(model_type, ref, "r2"), SETTINGS)]
              for ref in (plain_ref, offset_ref)}
    assert np.allclose(scores[plain_ref.path], scores[offset_ref.path], atol=2e-3), scores
    # Without the z-score (the float32 cast alone: values 2 apart, where the target's spread is about 1.5),
    # the offset target loses R².
    train, val = kfold_splits(offset.n_rows, 3, 5)[0]
    encoding = dataclasses.replace(TreeEncoding.of(offset), target_scaling=None, feature_scaling={})
    fitter = libraries.fitter_for(model_type)
    fold = fitter.prepare_fold(offset.X[train], offset.y[train], offset.X[val], offset.y[val], SETTINGS, encoding)
    rounded = fitter.fit(fold, dict(PARAMS[model_type]), 0, SETTINGS).score
    assert rounded < scores[offset_ref.path][0] - 0.01


def test_the_survivors_data_takes_the_float32_path_of_before():
    ds = embedded_survivors(1500)
    encoding = TreeEncoding.of(ds)
    assert encoding.is_plain and not encoding.feature_scaling and encoding.target_scaling is None
    # Exactly the float32 arrays the trees got when the data was float32.
    assert encoding.features(ds.X).dtype == np.float32
    assert encoding.features(ds.X).tobytes() == ds.X.astype(np.float32).tobytes()
    assert encoding.target(ds.y).tobytes() == ds.y.astype(np.float32).tobytes()
    assert encoding.predictions(np.float32([1.5, 2.25])).tolist() == [1.5, 2.25]


def test_the_encoding_scales_only_columns_float32_would_change_and_round_trips_as_json(tmp_path):
    ref = _write_table(tmp_path / "t.csv", "regression")
    ds = load_dataset(ref)
    X = np.column_stack([ds.X, np.arange(ds.n_rows, dtype=np.float64)])  # + an integer column: exact
    ds = dataclasses.replace(ds, X=X, feature_names=(*ds.feature_names, "n"))
    encoding = TreeEncoding.of(ds)
    assert sorted(encoding.feature_scaling) == [0, 1]  # x1, x2 (decimals); not colour's codes, not n
    assert not exact_in_float32(ds.X[:, 0]) and exact_in_float32(ds.X[:, 2]) and exact_in_float32(X[:, 3])
    z = encoding.feature_scaling[0]
    assert z.mean == pytest.approx(np.nanmean(ds.X[:, 0])) and z.std == pytest.approx(np.nanstd(ds.X[:, 0]))
    again = TreeEncoding.from_json(json.loads(json.dumps(encoding.to_json())))
    assert again == encoding
    assert again.features(X).tobytes() == encoding.features(X).tobytes()
    assert np.isnan(encoding.features(X)[:, 0]).sum() == np.isnan(X[:, 0]).sum()


def test_the_tree_model_types_declare_every_task_metric_and_their_predict():
    for declared in TREES:
        assert declared.tasks == ("regression", "binary", "multiclass")
        assert set(declared.metrics) == set(tasks.METRICS)
        assert declared.predict is not None


def _native_predictions(model_type: str, model_dir: Path, X: np.ndarray, encoding: TreeEncoding) -> np.ndarray:
    """The saved file loaded with the library's own loader (not saved.py's), applied to encoded rows."""
    features = encoding.features(X)
    if model_type == "catboost":
        import catboost

        model = catboost.CatBoost()
        model.load_model(str(model_dir / "model.cbm"), format="cbm")
        data = libraries.CatBoostFitter().features(features, encoding)
        raw = model.predict(data, prediction_type="RawFormulaVal" if encoding.task == "regression" else "Probability")
        return raw if encoding.task != "binary" else raw[:, 1]
    if model_type == "lightgbm":
        import lightgbm

        return lightgbm.Booster(model_file=str(model_dir / "model.txt")).predict(features)
    import xgboost

    booster = xgboost.Booster(model_file=str(model_dir / "xgboost_model.json"))
    return booster.predict(xgboost.DMatrix(features, **libraries.XGBoostFitter.matrix_args(encoding)))


@pytest.mark.parametrize("task, metric", [("regression", "r2"), ("binary", "logloss"), ("multiclass", "accuracy")])
def test_a_refit_reproduces_the_study_and_saves_a_model_predict_applies_bit_for_bit(tmp_path, task, metric):
    ref = _write_table(tmp_path / "t.csv", task, rows=700)
    ds = load_dataset(ref)
    jobs = [_job(m, ref, metric, trial=i) for i, m in enumerate(MODEL_TYPES)]
    context = RunContext(output_dir=tmp_path, devices=[])
    with TreeParallelExecutor({**FAST, "tree_parallel_workers": 2}, context) as ex:
        study = ex.run_batch(jobs)
        assert all(r.status == "ok" for r in study), [r.error for r in study]
        refit_jobs = []
        for job in jobs:
            (tmp_path / job.model_type).mkdir()
            refit_jobs.append(RefitJob(job, str(tmp_path / job.model_type),
                                       [r.info for r in study if r.model_type == job.model_type]))
        refits = ex.refit(refit_jobs)
    splits = kfold_splits(ds.n_rows, 3, 5)
    for job, result in zip(jobs, refits):
        model_dir = tmp_path / job.model_type
        assert result.status == "ok", result.error
        assert (result.model_type, result.trial_number) == (job.model_type, job.trial_number)
        # The out-of-fold predictions' fold scores are the study's, exactly.
        study_scores = [r.score for r in study if r.model_type == job.model_type]
        oof = np.asarray(result.oof, dtype=np.float64)
        assert result.fold_scores == study_scores
        assert [tasks.score(metric, task, ds.y[val], oof[val]) for _, val in splits] == study_scores
        assert oof.shape == ((ds.n_rows, 3) if task == "multiclass" else (ds.n_rows,)) and not np.isnan(oof).any()
        # The fit on every row: the rounded mean of the study's best iterations.
        best = [r.info["best_iteration"] for r in study if r.model_type == job.model_type]
        assert result.info["rounds"] == max(1, round(sum(best) / len(best)))
        assert "trained_model_max_abs_difference" not in result.info  # the saved model is the trained one
        # Saved in the library's own format beside tree_model.json; predict gives the refit's predictions.
        native = {"catboost": "model.cbm", "lightgbm": "model.txt", "xgboost": "xgboost_model.json"}[job.model_type]
        assert sorted(result.files) == sorted([native, "tree_model.json"])
        assert sorted(p.name for p in model_dir.iterdir()) == sorted(result.files)  # no arrays file left
        meta = json.loads((model_dir / "tree_model.json").read_text())
        assert (meta["library"], meta["task"], meta["rounds"]) == (job.model_type, task, result.info["rounds"])
        assert meta["n_classes"] == {"regression": 0, "binary": 2, "multiclass": 3}[task]
        assert meta["encoding"]["categorical"] == ["colour"]
        predicted = saved.predict(model_dir, ds.X)
        assert predicted.tolist() == result.predictions  # bit for bit
        declared = {m.name: m for m in TREES}[job.model_type]
        assert declared.predict is not None
        assert np.array_equal(declared.predict(model_dir, ds.X), predicted)
        encoding = TreeEncoding.from_json(meta["encoding"])
        native_predictions = _native_predictions(job.model_type, model_dir, ds.X, encoding)
        assert np.array_equal(encoding.predictions(native_predictions), predicted)
        # The fit on every row learned the table: its own rows' score beats the held-out one.
        in_sample = tasks.score(metric, task, ds.y, predicted)
        mean_held_out = sum(study_scores) / len(study_scores)
        assert in_sample <= mean_held_out if metric == "logloss" else in_sample >= mean_held_out


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_category_unseen_in_training_predicts_as_missing(tmp_path, model_type):
    ref = _write_table(tmp_path / "t.csv", "binary", rows=600)
    ds = load_dataset(ref)
    job = _job(model_type, ref, "logloss")
    cache = FoldDataCache()
    results = run_trial(job, SETTINGS, cache)
    from watcher_plugins.tree_parallel.trial import run_refit

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    output = run_refit(RefitJob(job, str(model_dir), [r.info for r in results]), SETTINGS, cache)
    assert output.result.status == "ok", output.result.error
    new = tmp_path / "new.csv"
    new.write_text("x1,x2,colour\n0.5,0.25,purple\n0.5,0.25,\n0.5,0.25,red\n,0.25,red\n", encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = load_features(new, ds.schema())
    assert any(issubclass(w.category, DataWarning) and "purple" in str(w.message) for w in caught)
    assert np.isnan(X[0, 2]) and np.isnan(X[1, 2]) and X[2, 2] == ds.categories["colour"].index("red")
    p = saved.predict(model_dir, X)
    assert p.shape == (4,) and np.isfinite(p).all()
    assert p[0] == p[1]  # the unseen colour takes the missing colour's path
    assert p[2] != p[0]  # a known colour does not


def test_a_refit_of_a_model_type_it_does_not_train_fails_without_starting_workers(tmp_path):
    with TreeParallelExecutor(FAST, RunContext(output_dir=tmp_path, devices=[])) as ex:
        (result,) = ex.refit([RefitJob(TrialJob("nn", 0, {}, DataRef(embedded="survivors", rows=200), 2, 1),
                                       str(tmp_path))])
        assert ex._pool is None
    assert result.status == "fail" and "cannot refit model type 'nn'" in result.error


def test_a_refit_whose_folds_fail_is_a_failed_result_and_the_worker_serves_on(tmp_path):
    ref = _write_table(tmp_path / "t.csv", "regression", rows=300)
    bad = TrialJob("lightgbm", 3, {"num_leaves": -3}, ref, 3, seed=5)
    good = _job("lightgbm", ref, "r2")
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    with TreeParallelExecutor({**FAST, "tree_parallel_workers": 1}, RunContext(output_dir=tmp_path, devices=[])) as ex:
        failed, ok = ex.refit([RefitJob(bad, str(tmp_path / "bad")), RefitJob(good, str(tmp_path / "good"))])
        assert ex.pool.restarts == 0
    assert failed.status == "fail" and failed.error.startswith("fold 0: ") and "num_leaves" in failed.error
    assert (failed.oof, failed.predictions, list((tmp_path / "bad").iterdir())) == ([], [], [])
    # Without the study's fold infos, the rounds come from the refit's own folds (the same fits).
    assert ok.status == "ok" and ok.info["rounds"] >= 1 and len(ok.predictions) == 300
