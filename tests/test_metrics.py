"""Metrics: each agrees with scikit-learn's on fresh random inputs; step 5 optimises the metric the params
name, in its direction, names it in trials.jsonl and the leaderboard, and refuses one that does not score
the task or that the model type does not report."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from test_model_types import plugin, suggest_const

from watcher_plugins.errors import ManifestError, PluginError
from watcher_plugins.manifest import load_manifest
from watcher_plugins.tasks import BINARY, MULTICLASS, REGRESSION, metric_for, score
from watcher_plugins.types import ModelType

metrics_sk = pytest.importorskip("sklearn.metrics")  # in the unit env (the ridge plugin's need)


@pytest.mark.parametrize("seed", range(5))
def test_every_metric_equals_scikit_learns_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.standard_normal(n) * 3 + 1e6 * seed  # an offset must not cost digits
    pred = y + rng.standard_normal(n)
    assert score("r2", REGRESSION, y, pred) == pytest.approx(metrics_sk.r2_score(y, pred), rel=1e-12)
    assert score("rmse", REGRESSION, y, pred) == pytest.approx(np.sqrt(metrics_sk.mean_squared_error(y, pred)),
                                                               rel=1e-12)
    assert score("mae", REGRESSION, y, pred) == pytest.approx(metrics_sk.mean_absolute_error(y, pred), rel=1e-12)

    yb = rng.integers(0, 2, n)
    p = np.round(rng.uniform(0.05, 0.95, n), 1)  # rounded: ties, which AUC counts half
    assert score("logloss", BINARY, yb, p) == pytest.approx(metrics_sk.log_loss(yb, p), rel=1e-12)
    assert score("auc", BINARY, yb, p) == pytest.approx(metrics_sk.roc_auc_score(yb, p), rel=1e-12)
    assert score("accuracy", BINARY, yb, p) == pytest.approx(metrics_sk.accuracy_score(yb, p >= 0.5), rel=1e-12)

    ym = rng.integers(0, 3, n)
    logits = rng.standard_normal((n, 3))
    pm = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert score("logloss", MULTICLASS, ym, pm) == pytest.approx(metrics_sk.log_loss(ym, pm, labels=[0, 1, 2]),
                                                                 rel=1e-12)
    assert score("auc", MULTICLASS, ym, pm) == pytest.approx(
        metrics_sk.roc_auc_score(ym, pm, multi_class="ovr", average="macro"), rel=1e-12)
    assert score("accuracy", MULTICLASS, ym, pm) == pytest.approx(metrics_sk.accuracy_score(ym, pm.argmax(1)))


def test_a_confident_wrong_probability_costs_a_bounded_log_loss():
    assert score("logloss", BINARY, np.array([0, 1]), np.array([1.0, 1.0])) == pytest.approx(-np.log(1e-15) / 2)


def test_a_task_has_a_default_metric_and_refuses_one_of_another_task():
    assert metric_for(REGRESSION, None).name == "r2"
    assert metric_for(BINARY, None).name == "logloss" and metric_for(MULTICLASS, "auc").direction == "maximize"
    with pytest.raises(ValueError, match="metric 'auc' does not score a regression task; metrics for regression: "
                                         "r2, rmse, mae"):
        metric_for(REGRESSION, "auc")


def _run(plugin_manager, tmp_path, metrics, register=True, **params):
    from watcher_plugins.compare_models import run_compare_models

    if register:
        plugin_manager.register(plugin(ModelType("const", suggest_const, seed_offset=7, metrics=metrics)))
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"params": {
        "model_types": ["const"], "trials": 4, "output_dir": str(tmp_path / "out"), "progress": False,
        "devices": "cpu", "data": {"embedded": "survivors", "rows": 200}, "const_value": 0.5, **params}}))
    return run_compare_models(load_manifest(manifest, None, plugin_manager).params, plugin_manager)


def test_a_metric_to_minimise_makes_a_minimising_study_named_by_its_metric(plugin_manager, tmp_path, capsys):
    summary = _run(plugin_manager, tmp_path, ("r2", "rmse"), metric="rmse")
    study = optuna.load_study(study_name="compare_models-const", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    values = [t.value for t in study.trials]
    (row,) = summary["leaderboard"]
    assert row["best_score"] == min(values) and summary["metric"] == "rmse"
    assert summary["dataset"]["task"] == "regression" and summary["dataset"]["target"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert all("rmse" in line and "r2" not in line for line in lines)
    assert "best RMSE" in capsys.readouterr().out


def test_resuming_a_study_under_another_metric_is_refused(plugin_manager, tmp_path):
    _run(plugin_manager, tmp_path, ("r2", "rmse"))
    with pytest.raises(Exception, match="metric"):
        _run(plugin_manager, tmp_path, ("r2", "rmse"), register=False, metric="rmse")


def test_a_metric_of_another_task_is_bad_input_naming_the_param(plugin_manager, tmp_path):
    with pytest.raises(ManifestError) as info:
        _run(plugin_manager, tmp_path, ("r2", "auc"), metric="auc")
    (problem,) = info.value.problems
    assert "$.params.metric: metric 'auc' does not score a regression task" in problem
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_metric_the_model_type_does_not_report_is_refused(plugin_manager, tmp_path):
    with pytest.raises(PluginError, match="model type 'const' does not report 'mae', the metric this run optimises"):
        _run(plugin_manager, tmp_path, ("r2",), metric="mae")
