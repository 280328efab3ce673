"""Without the tree libraries (tox -e unit installs none), the tree model types are reported
unavailable with the command that installs them, and the NN part still runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

TREE_LIBRARIES = ("catboost", "lightgbm", "xgboost")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) for name in TREE_LIBRARIES),
    reason="a tree library is installed here; this scenario runs in `tox -e unit`, which installs none",
)


def test_tree_model_types_are_unavailable_and_nn_still_runs(tmp_path):
    params = {"trials": 1, "folds": 2, "data": {"embedded": "survivors", "rows": 300}, "nn_max_epochs": 5,
              "output_dir": str(tmp_path / "out"), "devices": "cpu"}
    result = subprocess.run([sys.executable, "-m", "watcher_plugins.agent", "--run-pipeline", "--start-step", "5",
                             "--end-step", "5", "--params", json.dumps(params)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    hint = "install it with: pip install 'watcher_plugins[trees]'"
    for name in TREE_LIBRARIES:
        assert f"compare_models: {name} unavailable: {name} is not installed; {hint}" in result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["model_type"] for row in summary["leaderboard"]] == ["nn"]
    assert summary["leaderboard"][0]["trials_complete"] == 1
    assert sorted(summary["unavailable"]) == sorted(TREE_LIBRARIES)
