"""Reproducible: with a seed, the same manifest gives the same trials and the same R^2 (fp32) on every
run, whatever n_concurrent_nn and nn_strategy are (the tree half is in test_tree_reproducible.py)."""

from __future__ import annotations

import json

import optuna
import pytest

from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.manifest import load_manifest

NN_SETTINGS = [
    {"n_concurrent_nn": 1, "nn_strategy": "serial"},
    {"n_concurrent_nn": 4, "nn_strategy": "fused"},
    {"n_concurrent_nn": 3, "nn_strategy": "streams"},
]


def run_and_read(plugin_manager, output_dir, **override) -> list[tuple]:
    # 14 trials: past TPE's 10 random start-up trials, so the later params depend on the earlier R^2.
    params = {"model_types": ["nn"], "trials": 14, "ask_batch_size": 4, "folds": 2, "devices": "cpu",
              "data": {"embedded": "survivors", "rows": 300}, "output_dir": str(output_dir), "progress": False,
              "nn_max_epochs": 12, "nn_patience": 4, **override}
    run_compare_models(load_manifest(None, json.dumps(params), plugin_manager).params, plugin_manager)
    study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{output_dir}/optuna.db")
    return [(t.number, t.state.name, t.params, t.value) for t in study.get_trials()]


def test_nn_study_is_the_same_whatever_the_concurrency_and_strategy(plugin_manager, tmp_path):
    runs = [run_and_read(plugin_manager, tmp_path / f"run{i}", **setting) for i, setting in enumerate(NN_SETTINGS)]
    reference = runs[0]
    assert len(reference) == 14 and all(state == "COMPLETE" for _, state, _, _ in reference)
    for run in runs[1:]:
        assert [(n, s, p) for n, s, p, _ in run] == [(n, s, p) for n, s, p, _ in reference]
        for (_, _, _, value), (_, _, _, expected) in zip(run, reference):
            assert value == pytest.approx(expected, abs=1e-4)


def test_the_same_run_twice_gives_identical_results(plugin_manager, tmp_path):
    assert run_and_read(plugin_manager, tmp_path / "a") == run_and_read(plugin_manager, tmp_path / "b")
