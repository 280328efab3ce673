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
