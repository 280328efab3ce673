"""Reproducible: the tree studies are identical whatever tree_parallel_workers and xgboost_per_gpu are.
(Marked `trees` by conftest.py: `tox -e trees` runs it with the tree libraries installed.)"""

from __future__ import annotations

import json

import optuna

from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.manifest import load_manifest

TREES = ["catboost", "lightgbm", "xgboost"]


def run_and_read(plugin_manager, output_dir, workers: int, **more) -> dict[str, list[tuple]]:
    # 12 trials: past TPE's 10 random start-up trials, so the later params depend on the earlier R^2.
    params = {"model_types": TREES, "trials": 12, "ask_batch_size": 4, "folds": 2, "devices": "cpu",
              "data": {"embedded": "survivors", "rows": 300}, "output_dir": str(output_dir), "progress": False,
              "tree_rounds": 15, "tree_early_stopping_rounds": 5, "tree_parallel_workers": workers, **more}
    run_compare_models(load_manifest(None, json.dumps(params), plugin_manager).params, plugin_manager)
    out = {}
    for model_type in TREES:
        study = optuna.load_study(study_name=f"compare_models-{model_type}", storage=f"sqlite:///{output_dir}/optuna.db")
        out[model_type] = [(t.number, t.state.name, t.params, t.value) for t in study.get_trials()]
    return out


def test_tree_studies_are_identical_with_one_or_two_workers(plugin_manager, tmp_path):
    serial = run_and_read(plugin_manager, tmp_path / "serial", workers=1)
    parallel = run_and_read(plugin_manager, tmp_path / "parallel", workers=2)
    assert all(len(trials) == 12 and {t[1] for t in trials} == {"COMPLETE"} for trials in serial.values())
    assert parallel == serial
