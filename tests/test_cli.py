"""The watcher-agent CLI on bad input: exit code 2, one line per problem, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def agent(*args, cwd):
    return subprocess.run([sys.executable, "-m", "watcher_plugins.agent", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_schema_errors_exit_2_one_line_each_and_write_nothing(tmp_path):
    out_dir = tmp_path / "out"
    params = {"n_concurrent_nn": 0, "tree_parallel_workers": -1, "output_dir": str(out_dir)}
    result = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params),
                   cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'watcher-agent: error: --params::$.n_concurrent_nn: 0 is not valid: expected "auto" or an integer >= 1',
        'watcher-agent: error: --params::$.tree_parallel_workers: -1 is not valid: expected "auto" or an integer >= 1',
    ]
    assert "Traceback" not in result.stderr
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_manifest_file_is_named(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"params": {"trials": 0, "output_dir": str(tmp_path / "out")}}))
    result = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--manifest", str(manifest),
                   cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"watcher-agent: error: {manifest}::$.params.trials: 0 is less than the minimum of 1"
    assert not (tmp_path / "out").exists()


def test_not_json_params(tmp_path):
    result = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", "{trials: 3}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("watcher-agent: error: --params: not valid JSON: Expecting property name")


@pytest.mark.parametrize("start, end", [("6", "9"), ("1", "4")])
def test_step_range_without_a_registered_step_lists_the_steps(tmp_path, start, end):
    result = agent("--run-pipeline", "--start-step", start, "--end-step", end, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"watcher-agent: error: no registered pipeline step in the range {start}..{end}; "
                                     "registered steps: 5 (compare_models)")


def test_a_start_step_after_the_last_step_names_the_last_step(tmp_path):
    # No --end-step was given: the message must not name one.
    result = agent("--run-pipeline", "--start-step", "7", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "watcher-agent: error: --start-step 7 is after the last registered step, 5"


def test_bad_data_file_exits_2_naming_file_and_column(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,b,quality\n1,2,3\n4,5,6\n")
    params = {"data": {"path": str(data), "target": "score"}, "output_dir": str(tmp_path / "out")}
    result = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params),
                   cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"error: {data}: target column 'score' not found; columns: 'a', 'b', 'quality'")
    assert not (tmp_path / "out").exists()


def test_unknown_gpu_index_is_refused(tmp_path):
    params = {"devices": [7], "output_dir": str(tmp_path / "out")}
    result = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params),
                   cwd=tmp_path)
    assert result.returncode == 2
    assert "$.devices: GPU 7 not found" in result.stderr


def test_list_steps(tmp_path):
    result = agent("--list-steps", cwd=tmp_path)
    assert result.returncode == 0
    assert "5  compare_models" in result.stdout and "nn_batch (nn)" in result.stdout


def test_an_output_dir_that_cannot_be_created_exits_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    params = {"output_dir": str(blocker / "out"), "model_types": ["nn"], "data": {"embedded": "survivors", "rows": 100}}
    result = agent("--run-pipeline", "--start-step", "5", "--end-step", "5", "--params", json.dumps(params),
                   cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"watcher-agent: error: --params::$.output_dir: cannot write to {blocker / 'out'}: Not a directory")
    assert "Traceback" not in result.stderr


W = ("--run-pipeline", "--start-step", "5", "--end-step", "5")
SMALL = {"trials": 1, "folds": 2, "nn_max_epochs": 3, "tree_rounds": 5, "data": {"embedded": "survivors", "rows": 300}}


def test_an_unwritable_output_dir_creates_no_study_in_a_named_storage(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    db = tmp_path / "shared.db"
    params = {**SMALL, "storage": f"sqlite:///{db}", "output_dir": str(blocker / "out")}
    result = agent(*W, "--params", json.dumps(params), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"watcher-agent: error: --params::$.output_dir: cannot write to {blocker / 'out'}: Not a directory")
    assert not db.exists()  # no study, not even the database file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_nul_character_in_output_dir_exits_2_naming_its_json_path(tmp_path):
    result = agent(*W, "--params", json.dumps({**SMALL, "output_dir": "/tmp/x\u0000y"}), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ['watcher-agent: error: --params::$.output_dir: "/tmp/x\\u0000y" is not '
                                          'valid: expected a path without NUL characters']


def test_manifest_and_params_problems_are_reported_together(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"params": {"trials": 0}}))
    result = agent(*W, "--manifest", str(manifest), "--params", '{"folds": 1}', cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"watcher-agent: error: {manifest}::$.params.trials: 0 is less than the minimum of 1",
        "watcher-agent: error: --params::$.folds: 1 is less than the minimum of 2",
    ]


def test_an_unknown_gpu_set_in_the_manifest_names_the_manifest(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"params": {**SMALL, "devices": [7], "output_dir": str(tmp_path / "out")}}))
    result = agent(*W, "--manifest", str(manifest), "--params", '{"trials": 2}', cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"watcher-agent: error: {manifest}::$.params.devices: GPU 7 not found")
    assert not (tmp_path / "out").exists()
