"""End-to-end scenarios: the installed `watcher-agent`, run as an operator runs it, and its result files.

Run by `tox -e integration` against the installed package (with the tree libraries).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sigint_default import restore_default_sigint  # tests/ is on the path (pyproject's pythonpath)

from watcher_plugins.orphans import processes_with_environment

AGENT = shutil.which("watcher-agent")
MODEL_TYPES = ["nn", "catboost", "lightgbm", "xgboost"]


@pytest.fixture(autouse=True)
def _installed_agent():
    assert AGENT is not None, "watcher-agent is not on PATH: these scenarios test the installed package (pip install .)"


def run_agent(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def read_trials(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "trials.jsonl").read_text().splitlines()]


def study_states(output_dir: Path) -> list[str]:
    with sqlite3.connect(output_dir / "optuna.db") as db:
        return [state for (state,) in db.execute("SELECT state FROM trials")]


def test_quickstart_runs_step_5_on_the_shipped_manifest(tmp_path):
    """The README's first command, as a new user runs it."""
    result = run_agent("--run-pipeline", "--start-step", "5", "--end-step", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = tmp_path / "watcher_output"
    manifest = json.loads((Path(__file__).parents[1] / "agent_manifests" / "reinforcement.json").read_text())
    trials, folds = manifest["params"]["trials"], manifest["params"]["folds"]

    lines = read_trials(output_dir)
    assert len(lines) == trials * folds * len(MODEL_TYPES)
    assert {line["model_type"] for line in lines} == set(MODEL_TYPES)
    assert all(line["status"] == "ok" and -1.0 < line["r2"] <= 1.0 for line in lines)

    summary = json.loads((output_dir / "summary.json").read_text())
    assert sorted(row["model_type"] for row in summary["leaderboard"]) == sorted(MODEL_TYPES)
    for row in summary["leaderboard"]:
        r2s = [line["r2"] for line in lines if line["model_type"] == row["model_type"]
               and line["trial_number"] == row["best_trial"]]
        assert row["best_score"] == pytest.approx(sum(r2s) / len(r2s))  # best mean R2 over the folds
        assert row["trials_complete"] == trials and row["best_params"]
    assert summary["leaderboard"][0]["best_score"] > 0.3  # the embedded data has signal that every model finds
    assert (output_dir / "report.html").stat().st_size > 0
    assert set(study_states(output_dir)) == {"COMPLETE"}
    assert "compare_models leaderboard" in result.stdout
    assert "trials, best R2" in result.stderr  # progress while it works
    assert_opens_in_optuna_dashboard(output_dir / "optuna.db", trials)


def assert_opens_in_optuna_dashboard(db: Path, trials: int) -> None:
    """The storage is plain Optuna: optuna-dashboard's own API lists the studies and their trials."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    app = optuna_dashboard.wsgi(f"sqlite:///{db}")

    def get(path: str):
        environ: dict = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        status = []
        body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
        assert status == ["200 OK"], (path, status, body[:500])
        return json.loads(body)

    studies = get("/api/studies")["study_summaries"]
    assert sorted(s["study_name"] for s in studies) == sorted(f"compare_models-{m}" for m in MODEL_TYPES)
    for study in studies:
        assert len(get(f"/api/studies/{study['study_id']}")["trials"]) == trials


def test_params_override_with_a_users_csv(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 5))
    y = X[:, 0] * 2 - X[:, 1] ** 2 + 0.1 * rng.standard_normal(400)
    data = tmp_path / "mine.csv"
    data.write_text("a,b,c,d,e,quality\n" + "\n".join(",".join(f"{v:.6f}" for v in (*row, t))
                                                       for row, t in zip(X, y)))
    params = {"trials": 2, "model_types": ["nn", "lightgbm"], "folds": 2, "tree_parallel_workers": "auto",
              "n_concurrent_nn": 2, "data": {"path": str(data), "target": "quality"},
              "output_dir": str(tmp_path / "out"), "nn_max_epochs": 30}
    result = run_agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params),
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_trials(tmp_path / "out")
    assert sorted((line["model_type"], line["trial_number"], line["fold_idx"]) for line in lines) == sorted(
        (m, t, f) for m in ("nn", "lightgbm") for t in range(2) for f in range(2))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dataset"] == {"name": "mine.csv", "rows": 400, "features": 5, "target": "quality",
                                  "task": "regression", "classes": []}
    assert summary["metric"] == "r2" and set(summary["models"]) == {"nn", "lightgbm"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_a_signal_stops_workers_marks_trials_and_the_rerun_finishes(tmp_path, signum):
    marker = f"WATCHER_TEST_RUN={uuid.uuid4().hex}"
    params = {"trials": 6, "ask_batch_size": 2, "model_types": ["nn", "lightgbm"], "folds": 2,
              "data": {"embedded": "survivors", "rows": 1500}, "output_dir": str(tmp_path / "out"),
              "nn_max_epochs": 60, "tree_parallel_workers": 2}
    args = ["--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params)]
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    # The agent keeps a SIGINT ignored at its start (nohup ... &): give it the default, however tox was started.
    proc = subprocess.Popen([AGENT, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=restore_default_sigint)
    trials_file = tmp_path / "out" / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (trials_file.exists() and trials_file.read_text().strip()):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert "RUNNING" not in study_states(tmp_path / "out")  # unfinished trials were marked FAIL and re-queued
    time.sleep(1)
    assert processes_with_environment(marker) == []  # every worker stopped

    rerun = run_agent(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] is False
    for row in summary["leaderboard"]:
        assert row["trials_complete"] + row["trials_failed"] == 6
