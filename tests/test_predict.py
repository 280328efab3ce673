"""``watcher-agent predict`` end to end, through the real CLI in a subprocess, with models the ridge plugin
saves (tox's unit env installs it; the subprocesses run without WATCHER_BLOCK_PLUGINS, so that it loads):
regression, binary and 3-class models, their predictions equal to the refit's in-process ones bit for bit,
and bad input (a missing column, text in a numeric column, a damaged model directory, a model type not
installed) as exit 2 naming what is wrong, with nothing written."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_ridge_plugin import write_table

from watcher_plugins.manager import BLOCK_ENV, WatcherPluginManager

TASKS_PARAMS = {
    "regression": ("r2", {"alpha": 0.05, "l1_ratio": 0.5}),
    "binary": ("logloss", {"alpha": 0.1, "l1_ratio": 0.0}),
    "multiclass": ("logloss", {"alpha": 0.2, "l1_ratio": 0.25}),
}


def agent(*args, cwd, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != BLOCK_ENV}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "watcher_plugins.agent", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def unblocked_manager(monkeypatch) -> WatcherPluginManager:
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    pm = WatcherPluginManager()
    pm.load_plugins()
    return pm


def save_model(root, task: str, pm, seed: int = 0):
    """A model directory as step 5 leaves it: RidgeExecutor.refit's files and model.json. Returns the
    directory, the refit's result, the training CSV and its dataset."""
    from watcher_ridge.executor import RidgeExecutor

    from watcher_plugins.data import load_dataset
    from watcher_plugins.executor import RunContext
    from watcher_plugins.predict import plugin_of, write_model_json
    from watcher_plugins.records import DataRef, RefitJob, TrialJob

    root.mkdir(parents=True, exist_ok=True)
    data = write_table(root / "train.csv", task, seed=seed)
    metric, params = TASKS_PARAMS[task]
    job = TrialJob("ridge", 4, params, DataRef(path=str(data), target="target"), folds=3, seed=42, metric=metric)
    model_dir = root / "models" / "ridge"
    model_dir.mkdir(parents=True)
    with RidgeExecutor({"ridge_max_iter": 5000}, RunContext(output_dir=root, devices=[])) as executor:
        (result,) = executor.refit([RefitJob(job, str(model_dir))])
    assert result.status == "ok", result.error
    dataset = load_dataset(job.data)
    write_model_json(model_dir, model_type="ridge", executor="ridge", trial_number=4, params=params, metric=metric,
                     task=dataset.task, classes=list(dataset.classes), feature_schema=dataset.schema(),
                     fold_scores=result.fold_scores, files=result.files, info=result.info,
                     plugin=plugin_of("ridge", pm))
    return model_dir, result, data, dataset


def read_csv(text: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


@pytest.fixture
def binary_model(tmp_path, monkeypatch):
    return save_model(tmp_path, "binary", unblocked_manager(monkeypatch))


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_predict_writes_what_the_refit_model_predicted_in_process(tmp_path, monkeypatch, task):
    model_dir, result, data, dataset = save_model(tmp_path, task, unblocked_manager(monkeypatch))
    out = tmp_path / "predictions.csv"
    run = agent("predict", "--model", model_dir, "--data", data, "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == f"watcher-agent: wrote {dataset.n_rows} predictions to {out}"
    header, rows = read_csv(out.read_text())
    assert len(rows) == dataset.n_rows
    if task == "regression":
        assert header == ["prediction"]
        assert [float(r[0]) for r in rows] == result.predictions  # exactly: floats written as repr
        return
    classes = list(dataset.classes)
    assert header == ["prediction", *(f"probability_{c}" for c in classes)]
    probabilities = np.array([[float(v) for v in r[1:]] for r in rows])
    if task == "binary":
        assert classes == ["no", "yes"]
        assert probabilities[:, 1].tolist() == result.predictions
        assert probabilities[:, 0].tolist() == (1.0 - np.asarray(result.predictions)).tolist()
        assert [r[0] for r in rows] == [classes[int(p >= 0.5)] for p in result.predictions]
    else:
        assert classes == ["a", "b", "c"]
        assert probabilities.tolist() == result.predictions
        assert [r[0] for r in rows] == [classes[int(np.argmax(p))] for p in result.predictions]
    # Standard output, without --out: the same CSV.
    again = agent("predict", "--model", model_dir, "--data", data, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == out.read_text() and again.stderr == ""


def test_unseen_category_and_missing_cells_at_predict_time(tmp_path, binary_model):
    model_dir, _, _, _ = binary_model
    new = tmp_path / "new.csv"
    new.write_text("flag,x2,colour,x1,extra\nTrue,0.5,purple,1.0,z\nTrue,0.5,,1.0,z\nFalse,NA,red,,z\n")
    run = agent("predict", "--model", model_dir, "--data", new, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "watcher-agent: warning: " in run.stderr and "'colour'" in run.stderr and "'purple'" in run.stderr
    header, rows = read_csv(run.stdout)
    assert header == ["prediction", "probability_no", "probability_yes"] and len(rows) == 3
    assert rows[0] == rows[1]  # an unseen category is read as missing: the "other" column, as an empty cell
    assert rows[2] != rows[0] and all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])


def test_a_missing_column_is_exit_2_naming_it_and_writes_nothing(tmp_path, binary_model):
    model_dir, _, _, _ = binary_model
    new = tmp_path / "new.csv"
    new.write_text("x1,colour,target\n1.0,red,yes\n")
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    run = agent("predict", "--model", model_dir, "--data", new, "--out", out, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"watcher-agent: error: {new}: missing column(s) 'x2', 'flag': the model "
                                       "expects the features 'x1', 'x2', 'colour', 'flag'"]
    assert list(out.parent.iterdir()) == [] and run.stdout == ""


def test_text_in_a_numeric_column_is_exit_2_naming_column_and_row(tmp_path, binary_model):
    model_dir, _, _, _ = binary_model
    new = tmp_path / "new.csv"
    new.write_text("x1,x2,colour,flag\n1.0,2.0,red,True\n1.5,two,red,False\noops,1,blue,True\n")
    out = tmp_path / "p.csv"
    out.write_text("the previous predictions\n")
    run = agent("predict", "--model", model_dir, "--data", new, "--out", out, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"watcher-agent: error: {new}: column ") for line in lines)
    assert "'x1'" in lines[0] and "data row 3" in lines[0] and "'oops'" in lines[0]
    assert "'x2'" in lines[1] and "data row 2" in lines[1] and "'two'" in lines[1]
    assert out.read_text() == "the previous predictions\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "new.csv", "p.csv", "train.csv"]


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "model.json").write_text('{"format_version": 1, "model_type": '), "not valid JSON"),
    (lambda d: (d / "model.json").write_text("[1, 2]"), "expected a JSON object, got list"),
    (lambda d: (d / "model.json").unlink(), "no model.json: not a model directory"),
    (lambda d: _edit(d, format_version=2), "format_version 2: this watcher_plugins (0.1.0) reads format 1; the model "
                                           "was saved by watcher_plugins 0.1.0"),
    (lambda d: _edit(d, task="ranking"), "task 'ranking': expected one of regression, binary, multiclass"),
    (lambda d: _edit(d, trial_number="4"), "'trial_number' is \"4\": expected a JSON integer"),
    (lambda d: _edit(d, feature_schema={"version": 1}), "feature schema: 'feature_names' must be a list"),
    (lambda d: (d / "ridge_model.json").unlink(), "ridge_model.json: missing: model.json lists it"),
])
def test_a_damaged_model_directory_is_exit_2_naming_it(tmp_path, binary_model, damage, expected):
    model_dir, _, data, _ = binary_model
    damage(model_dir)
    out = tmp_path / "p.csv"
    run = agent("predict", "--model", model_dir, "--data", data, "--out", out, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"watcher-agent: error: {model_dir}") and expected in line, line
    assert not out.exists() and "Traceback" not in run.stderr


def _edit(model_dir, **changes):
    path = model_dir / "model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_damaged_ridge_model_file_is_exit_2_naming_it(tmp_path, binary_model):
    model_dir, _, data, _ = binary_model
    path = model_dir / "ridge_model.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "coef": [[1.0, 2.0]]}))
    run = agent("predict", "--model", model_dir, "--data", data, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith(f"watcher-agent: error: {path}: not a ridge model: coef of shape (1, 2)")


def test_no_model_directory_is_exit_2(tmp_path):
    run = agent("predict", "--model", tmp_path / "nowhere", "--data", tmp_path / "x.csv", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"watcher-agent: error: {tmp_path / 'nowhere'}: no such model directory "
                                  "(expected OUTPUT_DIR/models/MODEL_TYPE, written by compare_models with refit_best)")


def test_a_model_type_whose_plugin_is_not_here_says_which(tmp_path, binary_model):
    model_dir, _, data, _ = binary_model
    saved = json.loads((model_dir / "model.json").read_text())
    assert saved["plugin"] == {"name": "ridge", "module": "watcher_ridge.plugin", "package": "watcher-ridge",
                               "version": "0.1.0"}
    blocked = agent("predict", "--model", model_dir, "--data", data, cwd=tmp_path, env_extra={BLOCK_ENV: "ridge"})
    assert blocked.returncode == 2
    assert blocked.stderr.strip() == (
        f"watcher-agent: error: {model_dir}: model type 'ridge' (executor 'ridge') is not registered: its plugin "
        f"'ridge' (package watcher-ridge 0.1.0) is blocked here by {BLOCK_ENV}=ridge; registered model types: "
        "catboost, lightgbm, nn, xgboost")
    _edit(model_dir, model_type="lasso", executor="lasso",
          plugin={"name": "lasso", "module": "watcher_lasso.plugin", "package": "watcher-lasso", "version": "2.0"})
    missing = agent("predict", "--model", model_dir, "--data", data, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith(
        f"watcher-agent: error: {model_dir}: model type 'lasso' (executor 'lasso') is not registered: its plugin "
        "'lasso' (package watcher-lasso 2.0) is not installed here: pip install watcher-lasso; registered model "
        "types: catboost, lightgbm, nn, ridge, xgboost")


def test_a_model_that_step_5_saved_predicts_what_its_refit_predicted(tmp_path):
    """The whole path: a real step 5 run (refit_best) saves the model; predict on its training rows gives
    what the same refit gives in process."""
    from watcher_ridge.executor import RidgeExecutor

    from watcher_plugins.executor import RunContext
    from watcher_plugins.records import DataRef, RefitJob, TrialJob

    data = write_table(tmp_path / "train.csv", "multiclass", seed=5)
    params = {"model_types": ["ridge"], "trials": 3, "folds": 3, "output_dir": "out", "progress": False,
              "devices": "cpu", "metric": "accuracy", "data": {"path": str(data), "target": "target"}}
    run = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    model_dir = tmp_path / "out" / "models" / "ridge"
    saved = json.loads((model_dir / "model.json").read_text())
    assert (saved["format_version"], saved["model_type"], saved["executor"], saved["task"], saved["metric"],
            saved["classes"]) == (1, "ridge", "ridge", "multiclass", "accuracy", ["a", "b", "c"])
    assert saved["files"] == ["ridge_model.json"] and saved["plugin"]["package"] == "watcher-ridge"
    out = tmp_path / "p.csv"
    predicted = agent("predict", "--model", model_dir, "--data", data, "--out", out, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    seed = json.loads((tmp_path / "out" / "summary.json").read_text())["params"]["seed"]
    job = TrialJob("ridge", saved["trial_number"], saved["params"], DataRef(path=str(data), target="target"),
                   folds=3, seed=seed, metric="accuracy")
    (tmp_path / "again").mkdir()
    with RidgeExecutor({"ridge_max_iter": 5000}, RunContext(output_dir=tmp_path, devices=[])) as executor:
        (result,) = executor.refit([RefitJob(job, str(tmp_path / "again"))])
    assert result.fold_scores == saved["fold_scores"]
    _, rows = read_csv(out.read_text())
    assert [[float(v) for v in r[1:]] for r in rows] == result.predictions


def test_help_explains_both_commands(tmp_path):
    top = agent("--help", cwd=tmp_path)
    assert top.returncode == 0 and "--run-pipeline" in top.stdout
    assert "watcher-agent predict --model OUTPUT_DIR/models/MODEL_TYPE" in " ".join(top.stdout.split())
    sub = agent("predict", "--help", cwd=tmp_path)
    text = " ".join(sub.stdout.split())
    assert sub.returncode == 0 and sub.stdout.startswith("usage: watcher-agent predict ")
    for words in ("--model DIR", "--data FILE", "--out FILE", "--format FMT", "probability_<label>",
                  "2 bad input"):
        assert words in text, words
    no_args = agent("predict", cwd=tmp_path)
    assert no_args.returncode == 2 and "the following arguments are required: --model, --data" in no_args.stderr


def test_model_json_round_trips(tmp_path):
    from watcher_plugins.data import FeatureSchema
    from watcher_plugins.predict import read_model_json, write_model_json

    (tmp_path / "weights.bin").write_bytes(b"")
    schema = FeatureSchema(("a", "b"), {"b": ("x", "y")}, task="binary", classes=("n", "p"), target="t")
    write_model_json(tmp_path, model_type="ridge", executor="ridge", trial_number=3, params={"alpha": 0.1},
                     metric="auc", task="binary", classes=["n", "p"], feature_schema=schema.to_json(),
                     fold_scores=[0.1, None, 0.30000000000000004], files=["weights.bin"], info={"rounds": 7},
                     plugin=None)
    saved = read_model_json(tmp_path)
    assert saved.schema == schema and saved.fold_scores == [0.1, None, 0.30000000000000004]
    assert (saved.model_type, saved.trial_number, saved.classes, saved.files, saved.info, saved.plugin) == (
        "ridge", 3, ("n", "p"), ["weights.bin"], {"rounds": 7}, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "weights.bin"]  # no temporary left


def test_the_out_of_fold_predictions_reproduce_the_fold_scores_in_the_summary(tmp_path):
    from watcher_plugins.tasks import score

    data = write_table(tmp_path / "train.csv", "multiclass", seed=7)
    params = {"model_types": ["ridge"], "trials": 3, "folds": 3, "output_dir": "out", "progress": False,
              "devices": "cpu", "metric": "logloss", "data": {"path": str(data), "target": "target"}}
    run = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (row,) = summary["leaderboard"]
    classes = summary["dataset"]["classes"]
    header, rows = read_csv((tmp_path / "out" / "oof_predictions.csv").read_text())
    assert header == ["row", "fold", "target", *(f"ridge_probability_{c}" for c in classes)]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    scores = []
    for k in range(3):
        part = [r for r in rows if r[1] == str(k)]
        y = np.array([classes.index(r[2]) for r in part])
        p = np.array([[float(v) for v in r[3:]] for r in part])
        scores.append(score("logloss", "multiclass", y, p))
    assert scores == row["best_fold_scores"] and summary["models"]["ridge"]["oof_fold_scores"] == scores
    assert row["best_score"] == pytest.approx(sum(scores) / 3, abs=1e-12)
