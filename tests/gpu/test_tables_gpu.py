"""#20 on a GPU: a user's messy table (empty cells, NA markers, a text column, a True/False column) for
each task, through step 5 with every model type on the GPU, the best trials refit and saved, and
``watcher-agent predict`` on every saved model. The CPU suite proves the numbers (tests/test_predict.py,
test_nn_refit.py, test_tree_tables.py); here the GPU paths run: NN classification packs on CUDA, the
NN's and the trees' refits on the GPU, CatBoost's and XGBoost's categoricals on CUDA."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from test_ridge_plugin import write_table
from test_tree_gpu import GPUS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]

MODEL_TYPES = ["nn", "catboost", "lightgbm", "xgboost"]


def agent(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher_plugins.agent", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("task, metric", [("regression", "r2"), ("binary", "auc"), ("multiclass", "logloss")])
def test_a_messy_table_trains_refits_and_predicts_on_the_gpu(tmp_path, task, metric):
    pytest.importorskip("catboost")
    data = write_table(tmp_path / "train.csv", task, rows=3000, seed=3)
    params = {"model_types": MODEL_TYPES, "trials": 2, "ask_batch_size": 2, "folds": 3, "output_dir": "out",
              "progress": False, "devices": "auto", "metric": metric, "nn_max_epochs": 40, "nn_patience": 8,
              "tree_rounds": 80, "data": {"path": str(data), "target": "target"}}
    run = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "differ from the study's" not in run.stderr, run.stderr[-4000:]  # refit folds = study folds
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted((line["model_type"], line["trial_number"], line["fold_idx"]) for line in lines) == sorted(
        (m, t, f) for m in MODEL_TYPES for t in range(2) for f in range(3))
    assert all(line["status"] == "ok" and np.isfinite(line[metric]) for line in lines), lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["task"] == task and summary["metric"] == metric
    assert set(summary["models"]) == set(MODEL_TYPES), summary["models"]
    classes = summary["dataset"]["classes"]
    for model_type in MODEL_TYPES:
        model_dir = out / "models" / model_type
        saved = json.loads((model_dir / "model.json").read_text())
        row = next(r for r in summary["leaderboard"] if r["model_type"] == model_type)
        assert saved["fold_scores"] == row["best_fold_scores"], model_type  # the refit's folds on the GPU
        predicted = agent("predict", "--model", model_dir, "--data", data, cwd=tmp_path)
        assert predicted.returncode == 0, (model_type, predicted.stderr)
        table = list(csv.reader(io.StringIO(predicted.stdout)))
        header, rows = table[0], table[1:]
        assert len(rows) == 3000, model_type
        if task == "regression":
            assert header == ["prediction"] and all(np.isfinite(float(r[0])) for r in rows)
            continue
        assert header == ["prediction", *(f"probability_{c}" for c in classes)], model_type
        probabilities = np.array([[float(v) for v in r[1:]] for r in rows])
        assert ((probabilities >= 0) & (probabilities <= 1)).all(), model_type
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5), model_type
        with open(data, newline="") as fh:
            truth = [r["target"] for r in csv.DictReader(fh)]
        accuracy = np.mean([r[0] == t for r, t in zip(rows, truth)])
        majority = max(truth.count(c) for c in classes) / len(truth)
        assert accuracy > majority + 0.05, (model_type, accuracy, majority)  # the signal is strong
