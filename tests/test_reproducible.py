"""Reproducible: with a seed, the same manifest gives the same trials and the same R^2 to the bit on
every run, whatever n_concurrent_nn and nn_strategy are, and the same trials.jsonl apart from timings
(the tree half is in test_tree_reproducible.py)."""

from __future__ import annotations

import json

import optuna

from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.manifest import load_manifest

NN_SETTINGS = [
    {"n_concurrent_nn": 1, "nn_strategy": "auto"},  # auto at 1: serial
    {"n_concurrent_nn": "auto", "nn_strategy": "auto"},  # fused packs sized by the memory budget
    {"n_concurrent_nn": 4, "nn_strategy": "serial"},
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


def trial_lines(output_dir) -> list[str]:
    """trials.jsonl with the timings taken out: each line without its "seconds", the lines sorted (they
    are written as folds finish, so their order is a timing too)."""
    lines = []
    for line in (output_dir / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert isinstance(record.pop("seconds"), float)
        lines.append(json.dumps(record))
    return sorted(lines)


def test_nn_study_is_the_same_whatever_the_concurrency_and_strategy(plugin_manager, tmp_path):
    runs = [run_and_read(plugin_manager, tmp_path / f"run{i}", **setting) for i, setting in enumerate(NN_SETTINGS)]
    reference = runs[0]
    assert len(reference) == 14 and all(state == "COMPLETE" for _, state, _, _ in reference)
    assert len({value for _, _, _, value in reference}) == 14  # real, different values: equality means something
    for setting, run in zip(NN_SETTINGS[1:], runs[1:]):
        assert run == reference, setting
    lines = [trial_lines(tmp_path / f"run{i}") for i in range(len(NN_SETTINGS))]
    assert len(lines[0]) == 14 * 2
    for setting, run_lines in zip(NN_SETTINGS[1:], lines[1:]):
        assert run_lines == lines[0], setting


def test_the_same_run_twice_gives_identical_results(plugin_manager, tmp_path):
    assert run_and_read(plugin_manager, tmp_path / "a") == run_and_read(plugin_manager, tmp_path / "b")
