"""compare_models orchestration: asked in batches, told in trial-number order, nothing left RUNNING.

These tests drive the step with tiny test executors registered through the public hook, the way a
third-party plugin would, so that ordering and fault handling can be forced; the real executors are
exercised end to end in test_reproducible.py and integration/test_pipeline.py.
"""

from __future__ import annotations

import json
import math
import os
import signal

import optuna
import pytest

from watcher_plugins import hookimpl
from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.errors import (
    DataError,
    ExecutorError,
    ManifestError,
    OutputDirError,
    PluginError,
    StorageError,
)
from watcher_plugins.executor import Executor
from watcher_plugins.manifest import load_manifest
from watcher_plugins.records import FoldResult
from watcher_plugins.storage import StudyStore
from watcher_plugins.types import WatcherExecutor


def score(params: dict, fold_idx: int) -> float:
    """A deterministic stand-in objective of the NN search space."""
    return -((math.log10(params["lr"]) + 2.5) ** 2) - 0.01 * len(params["hidden_layers"]) + 0.001 * fold_idx


class ReversingExecutor(Executor):
    """Finishes the folds of a batch in reverse order, as a parallel executor might."""

    batches: list[list[int]] = []
    interrupt_on_batch: int | None = None
    stop_mid_batch: int | None = None
    data_shape: tuple[int, int] | None = None

    def run_batch(self, jobs, on_result=None):
        type(self).batches.append([job.trial_number for job in jobs])
        type(self).data_shape = self.context.data_shape
        if type(self).interrupt_on_batch == len(type(self).batches):
            raise KeyboardInterrupt
        if type(self).stop_mid_batch == len(type(self).batches):  # the first trial done, the second begun
            first, second = jobs[0], jobs[1]
            for fold in range(first.folds):
                on_result(FoldResult(first.trial_number, fold, first.model_type, score(first.params, fold), 0.01))
            on_result(FoldResult(second.trial_number, 0, second.model_type, score(second.params, 0), 0.01))
            raise KeyboardInterrupt
        results = []
        for job in reversed(jobs):
            for fold in reversed(range(job.folds)):
                if job.trial_number % 3 == 2 and fold == 1:
                    result = FoldResult(job.trial_number, fold, job.model_type, None, 0.01, "oom", "does not fit")
                else:
                    result = FoldResult(job.trial_number, fold, job.model_type, score(job.params, fold), 0.01)
                results.append(result)
                if on_result:
                    on_result(result)
        return results


class InOrderExecutor(ReversingExecutor):
    """Finishes everything in order, and only returns results (no callbacks)."""

    def run_batch(self, jobs, on_result=None):
        type(self).batches.append([job.trial_number for job in jobs])
        type(self).data_shape = self.context.data_shape
        return [FoldResult(j.trial_number, f, j.model_type, None, 0.01, "oom", "does not fit")
                if j.trial_number % 3 == 2 and f == 1 else
                FoldResult(j.trial_number, f, j.model_type, score(j.params, f), 0.01)
                for j in jobs for f in range(j.folds)]


class ConstantExecutor(Executor):
    """Any model type, every fold scores 0.5."""

    def run_batch(self, jobs, on_result=None):
        return [FoldResult(j.trial_number, f, j.model_type, 0.5, 0.01) for j in jobs for f in range(j.folds)]


class PickyExecutor(ConstantExecutor):
    """Refuses every run in check(), as tree_parallel refuses tree_device "gpu" on a run without GPUs."""

    @classmethod
    def check(cls, params, context):
        raise ExecutorError("tree_device is 'gpu' but the run has no GPU (devices is empty)")


class TestExecutors:
    @hookimpl
    def watcher_executors(self):
        yield WatcherExecutor(name="reversing", model_types=("nn",), load=lambda: ReversingExecutor,
                              result_params=("nn_max_epochs",), result_tags={"scoring": "v2"})
        yield WatcherExecutor(name="in_order", model_types=("nn",), load=lambda: InOrderExecutor)
        yield WatcherExecutor(name="constant", model_types=("lightgbm",), load=lambda: ConstantExecutor,
                              result_params=("tree_rounds",))
        yield WatcherExecutor(name="picky", model_types=("lightgbm",), load=lambda: PickyExecutor,
                              params_schema={"properties": {"picky_knob": {"type": "integer", "default": 1}}})


@pytest.fixture
def pm(plugin_manager):
    plugin_manager.register(TestExecutors())
    ReversingExecutor.batches = []
    ReversingExecutor.interrupt_on_batch = None
    ReversingExecutor.stop_mid_batch = None
    InOrderExecutor.batches = []
    return plugin_manager


def _params(pm, tmp_path, **override):
    base = {"model_types": ["nn"], "trials": 7, "ask_batch_size": 3, "folds": 3, "devices": "cpu",
            "data": {"embedded": "survivors", "rows": 300}, "output_dir": str(tmp_path / "out"), "progress": False,
            "executors": {"nn": "reversing"}}
    base.update(override)
    return load_manifest(None, json.dumps(base), pm).params


def _trajectory(output_dir):
    study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{output_dir}/optuna.db")
    return [(t.number, t.state.name, t.params, t.value) for t in study.get_trials()]


def test_trajectory_is_the_same_whatever_order_results_arrive_in(pm, tmp_path, capsys):
    run_compare_models(_params(pm, tmp_path / "a", executors={"nn": "reversing"}), pm)
    run_compare_models(_params(pm, tmp_path / "b", executors={"nn": "in_order"}), pm)
    a, b = _trajectory(tmp_path / "a" / "out"), _trajectory(tmp_path / "b" / "out")
    assert a == b
    assert len(a) == 7
    assert ReversingExecutor.batches == [[0, 1, 2], [3, 4, 5], [6]]  # ask_batch_size, then the remainder


def test_outputs_trial_lines_summary_and_leaderboard(pm, tmp_path, capsys):
    summary = run_compare_models(_params(pm, tmp_path), pm)
    out_dir = tmp_path / "out"
    lines = [json.loads(line) for line in (out_dir / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 7 * 3
    assert set(lines[0]) >= {"study", "trial_number", "fold_idx", "model_type", "r2", "seconds", "status"}
    assert {line["study"] for line in lines} == {"compare_models-nn"}  # what tells studies sharing the file apart
    assert json.loads((out_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    (row,) = summary["leaderboard"]
    trials = _trajectory(out_dir)
    complete = [t for t in trials if t[1] == "COMPLETE"]
    failed = [t for t in trials if t[1] == "FAIL"]
    assert row["trials_complete"] == len(complete) and row["trials_failed"] == len(failed)
    best = max(complete, key=lambda t: t[3])
    assert row["best_score"] == pytest.approx(best[3]) and row["best_trial"] == best[0]
    assert set(row["best_params"]) == {"hidden_layers", "lr", "weight_decay", "dropout"}
    assert ReversingExecutor.data_shape == (300, 62)  # executors may plan by it (tree auto: host memory)
    printed = capsys.readouterr().out
    assert "compare_models leaderboard" in printed and f"{best[3]:.4f}" in printed
    report = (out_dir / "report.html").read_text()
    assert "Optimisation history" in report or "Optimization history" in report
    assert f"report: {out_dir / 'report.html'}" in printed


def test_a_failed_fold_fails_the_trial_with_its_reason(pm, tmp_path, capsys):
    run_compare_models(_params(pm, tmp_path, trials=12, ask_batch_size=12), pm)
    study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{tmp_path}/out/optuna.db")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [2, 5, 8, 11]
    for trial in failed:
        assert trial.user_attrs["fail_reason"] == "fold 1: oom: does not fit"
    assert "nn: 4 trial(s) failed, most often: fold 1: oom: does not fit" in capsys.readouterr().out


def test_resuming_runs_only_the_missing_trials(pm, tmp_path):
    run_compare_models(_params(pm, tmp_path, trials=4), pm)
    ReversingExecutor.batches = []
    run_compare_models(_params(pm, tmp_path, trials=4), pm)
    assert ReversingExecutor.batches == []  # nothing completed is recomputed
    run_compare_models(_params(pm, tmp_path, trials=6), pm)
    assert ReversingExecutor.batches == [[4, 5]]


def test_an_interrupted_batch_leaves_nothing_running_and_is_asked_again(pm, tmp_path):
    ReversingExecutor.interrupt_on_batch = 2
    with pytest.raises(KeyboardInterrupt):
        run_compare_models(_params(pm, tmp_path), pm)
    trials = _trajectory(tmp_path / "out")
    assert {t[1] for t in trials} == {"COMPLETE", "FAIL", "WAITING"}  # none RUNNING
    assert [t[1] for t in trials[6:]] == ["WAITING"] * 3  # re-queued for the next run
    interrupted = trials[3:6]
    assert all(state == "FAIL" for _, state, _, _ in interrupted)
    ReversingExecutor.interrupt_on_batch = None
    ReversingExecutor.batches = []
    run_compare_models(_params(pm, tmp_path), pm)
    rerun = _trajectory(tmp_path / "out")
    assert [t[2] for t in rerun[6:9]] == [t[2] for t in interrupted]  # the same params, asked again first
    assert ReversingExecutor.batches == [[6, 7, 8], [9]]


def test_trials_that_finished_before_a_stop_are_told_and_only_the_rest_asked_again(pm, tmp_path, capsys):
    ReversingExecutor.stop_mid_batch = 2  # batch 2 is trials 3, 4, 5: trial 3 finishes, 4 has one fold
    with pytest.raises(KeyboardInterrupt):
        run_compare_models(_params(pm, tmp_path), pm)
    trials = _trajectory(tmp_path / "out")
    # Trial 2 failed on its own (the executor's OOM fold); 4 and 5 were stopped, failed and asked again.
    assert [t[1] for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "FAIL", "FAIL", "WAITING", "WAITING"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert trials[3][3] == pytest.approx(sum(r["r2"] for r in lines if r["trial_number"] == 3) / 3)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["leaderboard"][0]["trials_complete"] == 3
    ReversingExecutor.stop_mid_batch = None
    ReversingExecutor.batches = []
    run_compare_models(_params(pm, tmp_path), pm)
    assert ReversingExecutor.batches == [[6, 7, 8]]  # trials 4 and 5 again, then the last one
    assert [t[2] for t in _trajectory(tmp_path / "out")[6:8]] == [t[2] for t in trials[4:6]]


def test_a_ctrl_c_while_a_finished_batch_is_told_still_tells_it(pm, tmp_path, monkeypatch):
    from watcher_plugins.storage import StudyStore

    tell = StudyStore.tell

    def interrupted_once(self, study, trial, *args, **kwargs):
        if trial.number == 3 and not getattr(interrupted_once, "done", False):
            interrupted_once.done = True
            raise KeyboardInterrupt  # as batch 2 (trials 3, 4, 5, every fold finished) is being told
        return tell(self, study, trial, *args, **kwargs)

    monkeypatch.setattr(StudyStore, "tell", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run_compare_models(_params(pm, tmp_path), pm)
    # Trial 2 and 5 failed on their own (the executor's OOM fold): finished too, and not asked again.
    assert [t[1] for t in _trajectory(tmp_path / "out")] == ["COMPLETE", "COMPLETE", "FAIL"] * 2


@pytest.mark.sends_sigint
def test_ctrl_c_while_a_trial_is_being_asked_leaves_nothing_running(pm, tmp_path, monkeypatch):
    """The signal lands inside ``study.ask``, after the trial is written (seen once in CI): the trial
    must still end FAIL and be re-queued, not stay RUNNING."""
    asked = []
    ask = StudyStore.ask

    def ask_then_ctrl_c(self, study):
        trial = ask(self, study)
        asked.append(trial.number)
        if len(asked) == 5:  # the second trial of the second batch
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler here, before ask returns
        return trial

    monkeypatch.setattr(StudyStore, "ask", ask_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_compare_models(_params(pm, tmp_path), pm)
    trials = _trajectory(tmp_path / "out")
    assert {t[1] for t in trials} == {"COMPLETE", "FAIL", "WAITING"}  # none RUNNING
    assert [t[1] for t in trials[3:5]] == ["FAIL", "FAIL"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_resuming_with_other_defining_params_is_refused(pm, tmp_path):
    run_compare_models(_params(pm, tmp_path, trials=2), pm)
    with pytest.raises(StorageError, match=r"folds: stored 3, now 4"):
        run_compare_models(_params(pm, tmp_path, trials=2, folds=4), pm)
    # an executor's result params (here nn_max_epochs) are part of the definition too
    with pytest.raises(StorageError, match=r"nn_max_epochs: stored 100, now 50"):
        run_compare_models(_params(pm, tmp_path, trials=2, nn_max_epochs=50), pm)
    # params that only change speed are not: a different concurrency resumes the same study
    run_compare_models(_params(pm, tmp_path, trials=3, n_concurrent_nn=5), pm)


def test_a_refused_resume_of_a_named_storage_writes_nothing_and_says_what_to_change(pm, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_compare_models(_params(pm, tmp_path, trials=2, storage=url), pm)
    elsewhere = tmp_path / "fresh_out"
    with pytest.raises(StorageError, match=r"folds: stored 3, now 4\); resume it with the same params, or "
                                           r"choose another study_name$"):
        run_compare_models(_params(pm, tmp_path, trials=2, folds=4, storage=url, output_dir=str(elsewhere)), pm)
    assert not elsewhere.exists()  # another output_dir is no way out: the study is in the named storage
    # With the default storage in output_dir, another output_dir is another storage, and says so.
    own = str(tmp_path / "own")
    run_compare_models(_params(pm, tmp_path, trials=2, output_dir=own), pm)
    with pytest.raises(StorageError, match=r"choose another study_name or output_dir$"):
        run_compare_models(_params(pm, tmp_path, trials=2, folds=4, output_dir=own), pm)


def _write_rows(path, rows, offset=0, newline="\n", spelling="{}"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"a,y{newline}" + "".join(f"{spelling.format(a)},{y + offset}{newline}" for a, y in rows))


ROWS = [(i, (i * 7) % 11) for i in range(40)]


def test_a_data_file_whose_contents_changed_is_other_data(pm, tmp_path):
    # Same path, other rows: resuming would mix trials of two datasets in one study and one leaderboard.
    data = tmp_path / "d.csv"
    _write_rows(data, ROWS)
    params = {"data": {"path": str(data), "target": "y"}, "trials": 2}
    run_compare_models(_params(pm, tmp_path, **params), pm)
    _write_rows(data, ROWS, offset=1)
    with pytest.raises(StorageError, match=rf"was made with other data: the numbers read from {data} differ from "
                                           r"those it was made with \(SHA-256 \w{12}\.\.\. then, \w{12}\.\.\. now\); "
                                           r"restore that data, or choose another study_name or output_dir$"):
        run_compare_models(_params(pm, tmp_path, **{**params, "trials": 3}), pm)
    # The same numbers written again (other line endings, "2.0" for "2") are the same data.
    _write_rows(data, ROWS, newline="\r\n", spelling="{}.0")
    run_compare_models(_params(pm, tmp_path, **{**params, "trials": 3}), pm)
    assert len(_trajectory(tmp_path / "out")) == 3


def test_a_data_file_is_the_same_data_by_any_path(pm, tmp_path, monkeypatch):
    # README: a data file is identified by its contents' SHA-256, so naming it relative to another
    # directory, or absolute, or a copy of it, resumes the study.
    data = tmp_path / "d" / "good.csv"
    _write_rows(data, ROWS)
    run_compare_models(_params(pm, tmp_path, trials=1, data={"path": str(data), "target": "y"}), pm)
    monkeypatch.chdir(tmp_path)
    run_compare_models(_params(pm, tmp_path, trials=2, data={"path": "d/good.csv", "target": "y"}), pm)
    monkeypatch.chdir(data.parent)
    run_compare_models(_params(pm, tmp_path, trials=3, data={"path": "good.csv", "target": "y"}), pm)
    copy = tmp_path / "elsewhere" / "copy.csv"
    _write_rows(copy, ROWS)
    run_compare_models(_params(pm, tmp_path, trials=4, data={"path": str(copy), "target": "y"}), pm)
    assert len(_trajectory(tmp_path / "out")) == 4
    study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{tmp_path}/out/optuna.db")
    assert set(study.user_attrs["definition"]["data"]) == {"sha256", "target"}  # no path


def test_a_data_file_study_stored_by_an_earlier_release_still_resumes(pm, tmp_path, monkeypatch):
    data = tmp_path / "d" / "good.csv"
    _write_rows(data, ROWS)
    params = {"data": {"path": str(data), "target": "y"}}
    run_compare_models(_params(pm, tmp_path, trials=1, **params), pm)
    study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{tmp_path}/out/optuna.db")
    current = study.user_attrs["definition"]
    # Earlier releases named the file by its path as given, with its SHA-256 beside it: it resumes by the
    # SHA-256, from another path too, and is stored in the current form from then on.
    older = {**current, "data": {"path": "d/good.csv", "target": "y"}, "data_sha256": current["data"]["sha256"]}
    study.set_user_attr("definition", older)
    run_compare_models(_params(pm, tmp_path, trials=2, **params), pm)
    assert study.user_attrs["definition"] == current
    study.set_user_attr("definition", older)
    _write_rows(data, ROWS, offset=1)
    with pytest.raises(StorageError, match=r"was made with other data: the numbers read from .*good.csv differ"):
        run_compare_models(_params(pm, tmp_path, trials=3, **params), pm)
    # Before files were fingerprinted, the path alone named them: the same path resumes, as it did.
    study.set_user_attr("definition", {**current, "data": {"path": str(data), "target": "y"}})
    run_compare_models(_params(pm, tmp_path, trials=3, **params), pm)
    assert len(_trajectory(tmp_path / "out")) == 3


def test_a_study_nothing_was_trained_in_takes_the_params_of_the_run_that_uses_it(pm, tmp_path):
    # A run that stopped before its first trial (killed while it opened its studies, say) leaves an empty
    # study in the named storage; it must not refuse the next run's params.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    empty = optuna.create_study(storage=url, study_name="compare_models-nn")
    empty.set_user_attr("definition", {"folds": 3})
    run_compare_models(_params(pm, tmp_path, trials=2, folds=4, storage=url), pm)
    with pytest.raises(StorageError, match=r"folds: stored 4, now 3"):  # trained in now: protected
        run_compare_models(_params(pm, tmp_path, trials=3, storage=url), pm)


def test_a_study_an_older_release_computed_differently_is_refused(pm, tmp_path):
    # An executor's result_tags change when a release changes how its trials are computed (nn_batch:
    # the target's scaling): trials of before and after must not share a study.
    run_compare_models(_params(pm, tmp_path, trials=2), pm)
    study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{tmp_path}/out/optuna.db")
    study.set_user_attr("definition", {k: v for k, v in study.user_attrs["definition"].items() if k != "scoring"})
    with pytest.raises(StorageError, match=r"scoring: stored None, now 'v2'"):
        run_compare_models(_params(pm, tmp_path, trials=3), pm)
    from watcher_plugins import builtin

    (nn_batch,) = [e for e in builtin.watcher_executors() if e.name == "nn_batch"]
    assert nn_batch.result_tags == {"nn_target_scaling": "z-score", "nn_fit": "pack-v1"}


def test_a_changed_param_of_a_later_group_is_refused_before_anything_trains(pm, tmp_path):
    # The NN group runs first; its trials must not be trained (for hours, on a GPU) and then thrown
    # away because the tree group's study was made with another tree_rounds.
    both = {"model_types": ["nn", "lightgbm"], "executors": {"nn": "reversing", "lightgbm": "constant"}, "trials": 2}
    run_compare_models(_params(pm, tmp_path, **both), pm)
    ReversingExecutor.batches = []
    with pytest.raises(StorageError, match=r"tree_rounds: stored 300, now 20"):
        run_compare_models(_params(pm, tmp_path, **{**both, "trials": 4, "tree_rounds": 20}), pm)
    assert ReversingExecutor.batches == []
    assert len(_trajectory(tmp_path / "out")) == 2


def test_an_interrupted_summary_lists_the_model_types_that_never_started(pm, tmp_path, capsys):
    ReversingExecutor.interrupt_on_batch = 1
    both = {"model_types": ["nn", "lightgbm"], "executors": {"nn": "reversing", "lightgbm": "constant"}, "trials": 2}
    with pytest.raises(KeyboardInterrupt):
        run_compare_models(_params(pm, tmp_path, **both), pm)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["not_run"] == ["lightgbm"]
    assert "interrupted: these are the trials that finished before the run stopped; not run: lightgbm" \
        in capsys.readouterr().out
    ReversingExecutor.interrupt_on_batch = None
    assert run_compare_models(_params(pm, tmp_path, **both), pm)["not_run"] == []


def test_params_an_executor_refuses_stop_the_run_before_anything_trains(pm, tmp_path):
    # The NN group would run first: it must not train (for hours) before the tree group refuses the run.
    params = _params(pm, tmp_path, model_types=["nn", "lightgbm"], executors={"nn": "reversing", "lightgbm": "picky"})
    with pytest.raises(ManifestError) as excinfo:
        run_compare_models(params, pm)
    assert excinfo.value.problems == [  # devices and executors came from --params
        "--params (picky): tree_device is 'gpu' but the run has no GPU (devices is empty)"]
    assert ReversingExecutor.batches == [] and not (tmp_path / "out").exists()


def test_tree_parallel_checks_its_params_against_the_run_without_starting_anything(tmp_path, caplog):
    from watcher_plugins.executor import RunContext
    from watcher_plugins.tree_parallel.executor import TreeParallelExecutor

    with pytest.raises(ExecutorError, match="tree_device is 'gpu' but the run has no GPU"):
        TreeParallelExecutor.check({"tree_device": "gpu"}, RunContext(output_dir=tmp_path, devices=[]))
    # The check warns of nothing: the executor made for the run does, once.
    context = RunContext(output_dir=tmp_path, devices=[0], cpu_count=2)
    TreeParallelExecutor.check({"tree_device": "gpu", "tree_parallel_workers": 64}, context)
    assert not caplog.records
    ex = TreeParallelExecutor({"tree_device": "gpu", "tree_parallel_workers": 64}, context)
    assert [r.getMessage() for r in caplog.records] == [
        "tree_parallel_workers=64 capped to 2: one core per worker at least (2 cores)"]
    assert ex._pool is None  # nothing started


def test_a_lost_database_stops_the_clean_up_at_once(caplog):
    # Each fail_and_requeue waits out the storage's retries before StorageLost; after the first, the
    # others are left to the next run's stale check instead of delaying the stop by minutes.
    from types import SimpleNamespace

    from watcher_plugins.compare_models import StudyRunner
    from watcher_plugins.errors import StorageLost

    calls = []

    class LostStore:
        def fail_and_requeue(self, study, trial, reason):
            calls.append(trial.number)
            raise StorageLost("lost the connection to the study storage")

    runner = StudyRunner({"nn": None, "lightgbm": None}, {}, {}, None, LostStore(), None, None)
    asked = {"nn": [(SimpleNamespace(number=n), None) for n in range(3)],
             "lightgbm": [(SimpleNamespace(number=n), None) for n in range(2)]}
    runner._fail_unfinished(asked)
    assert calls == [0]
    assert "5 trials left RUNNING (lost the connection to the study storage)" in caplog.text


def test_the_default_row_count_written_out_or_not_is_one_study(pm, tmp_path):
    # {"embedded": "survivors"} is 6000 rows, the same data as {"embedded": "survivors", "rows": 6000}.
    run_compare_models(_params(pm, tmp_path, trials=1, data={"embedded": "survivors"}), pm)
    run_compare_models(_params(pm, tmp_path, trials=2, data={"embedded": "survivors", "rows": 6000}), pm)
    assert len(_trajectory(tmp_path / "out")) == 2


def test_a_study_made_before_the_default_row_count_was_written_out_still_resumes(pm, tmp_path):
    run_compare_models(_params(pm, tmp_path, trials=1, data={"embedded": "survivors"}), pm)
    study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{tmp_path}/out/optuna.db")
    older = {**study.user_attrs["definition"], "data": {"embedded": "survivors"}}  # as earlier versions stored it
    study.set_user_attr("definition", older)
    run_compare_models(_params(pm, tmp_path, trials=2, data={"embedded": "survivors"}), pm)
    assert len(_trajectory(tmp_path / "out")) == 2


def test_executor_choice_errors(pm, tmp_path):
    with pytest.raises(PluginError, match="several executors run 'nn' .*choose one with params.executors.nn"):
        run_compare_models(_params(pm, tmp_path, executors={}), pm)
    with pytest.raises(PluginError, match=r"^--params::\$.executors.nn: unknown executor 'nope'; registered executors: "
                                          "constant, in_order, nn_batch, picky, reversing, tree_parallel"):
        run_compare_models(_params(pm, tmp_path, executors={"nn": "nope"}), pm)
    with pytest.raises(PluginError, match="executor 'tree_parallel' does not run 'nn'"):
        run_compare_models(_params(pm, tmp_path, executors={"nn": "tree_parallel"}), pm)
    assert not (tmp_path / "out").exists()


def test_folds_of_one_held_out_row_are_refused_before_anything_is_written(pm, tmp_path, capsys):
    # R² of one held-out row is undefined (every model would score 0.0 as "ok").
    data = tmp_path / "five.csv"
    data.write_text("a,y\n" + "".join(f"{i},{i * i}\n" for i in range(5)))
    with pytest.raises(DataError, match=r"five.csv: 5 rows cannot make 3 folds: R² needs at least 2 held-out "
                                        r"rows a fold \(at most 2 folds\)"):
        run_compare_models(_params(pm, tmp_path, data={"path": str(data), "target": "y"}), pm)
    assert not (tmp_path / "out").exists()


def test_a_fold_whose_held_out_targets_are_all_equal_is_refused(pm, tmp_path):
    # One row of 40 has target 1, the rest 0: most held-out folds hold only zeros, where R² is
    # undefined (every model would score 0.0 as "ok" and the trial's mean would look like a result).
    data = tmp_path / "rare.csv"
    data.write_text("a,y\n" + "".join(f"{i},{int(i == 7)}\n" for i in range(40)))
    with pytest.raises(DataError, match=r"rare.csv: the 8 held-out rows of fold \d all have the target value 0, so "
                                        r"R² is undefined there: use fewer folds or another seed"):
        run_compare_models(_params(pm, tmp_path, folds=5, task="regression", data={"path": str(data), "target": "y"}),
                           pm)
    assert not (tmp_path / "out").exists()


def test_bad_data_file_fails_before_anything_is_written(pm, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,y\n1,2,3\n4,inf,6\n")  # "nan" would be a missing value
    with pytest.raises(DataError, match="column 'b' has a non-finite value"):
        run_compare_models(_params(pm, tmp_path, data={"path": str(bad), "target": "y"}), pm)
    assert not (tmp_path / "out").exists()
    assert ReversingExecutor.batches == []


def _studies(url: str) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(url))


def test_an_unwritable_output_dir_creates_no_study_in_a_named_storage(pm, tmp_path):
    # README: bad input writes nothing. The studies must not be created before output_dir is refused.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputDirError, match=r"^--params::\$.output_dir: cannot write to .*afile/out: Not a directory$"):
        run_compare_models(_params(pm, tmp_path, storage=url, output_dir=str(tmp_path / "afile" / "out")), pm)
    assert _studies(url) == []


def test_a_refused_study_leaves_no_other_study_created(pm, tmp_path):
    # nn's study comes first; lightgbm's, made with another tree_rounds, is refused: nn's must not have
    # been created meanwhile, nor the new output_dir.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_compare_models(_params(pm, tmp_path, model_types=["lightgbm"], executors={"lightgbm": "constant"},
                               storage=url, trials=1), pm)
    fresh = tmp_path / "fresh" / "out"
    both = {"model_types": ["nn", "lightgbm"], "executors": {"nn": "reversing", "lightgbm": "constant"}}
    with pytest.raises(StorageError, match=r"compare_models-lightgbm.*tree_rounds: stored 300, now 20"):
        run_compare_models(_params(pm, tmp_path, **both, storage=url, tree_rounds=20, output_dir=str(fresh)), pm)
    assert _studies(url) == ["compare_models-lightgbm"]
    assert not (tmp_path / "fresh").exists()


def test_a_refusal_removes_only_the_directories_the_run_made(pm, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_compare_models(_params(pm, tmp_path, trials=1, storage=url), pm)
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(StorageError, match="folds: stored 3, now 4"):
        run_compare_models(_params(pm, tmp_path, trials=1, folds=4, storage=url, output_dir=str(kept / "a" / "b")), pm)
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_an_output_dir_that_is_a_file_is_not_a_directory(pm, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputDirError) as excinfo:
        run_compare_models(_params(pm, tmp_path, output_dir=str(tmp_path / "afile")), pm)
    assert str(excinfo.value) == f"--params::$.output_dir: {tmp_path / 'afile'} exists and is not a directory"
    assert (tmp_path / "afile").read_text() == ""


def test_errors_found_late_name_the_source_of_the_value(pm, tmp_path):
    # Values checked only when the step uses them name the manifest or --params as schema errors do.
    manifest = tmp_path / "m.json"
    base = {"model_types": ["nn"], "trials": 1, "folds": 2, "data": {"embedded": "survivors", "rows": 300},
            "progress": False}

    def problem(manifest_params: dict, override: dict | None = None) -> str:
        manifest.write_text(json.dumps({"params": {**base, **manifest_params}}))
        params = load_manifest(manifest, json.dumps(override) if override else None, pm).params
        with pytest.raises((ManifestError, OutputDirError, PluginError, StorageError)) as excinfo:
            run_compare_models(params, pm)
        return str(excinfo.value)

    ok = {"devices": "cpu", "executors": {"nn": "reversing"}, "output_dir": str(tmp_path / "out")}
    assert problem({**ok, "devices": [7]}).startswith(f"{manifest}::$.params.devices: GPU 7 not found")
    assert problem(ok, {"devices": [7]}).startswith("--params::$.devices: GPU 7 not found")
    (tmp_path / "afile").write_text("")
    assert problem({**ok, "output_dir": str(tmp_path / "afile" / "x")}).startswith(
        f"{manifest}::$.params.output_dir: cannot write to")
    assert problem({**ok, "storage": "notadb://x"}).startswith(
        f"{manifest}::$.params.storage: cannot open Optuna storage notadb://x")
    assert problem({**ok, "executors": {"nn": "nope"}}).startswith(f"{manifest}::$.params.executors.nn: unknown executor")
    assert problem({**ok, "executors": {"nn": "reversing", "lightgbm": "picky"}, "model_types": ["nn", "lightgbm"]}) \
        == f"{manifest} (picky): tree_device is 'gpu' but the run has no GPU (devices is empty)"
    # The check weighs the executor's params against the devices: it names every source that set one.
    both = {**ok, "executors": {"nn": "reversing", "lightgbm": "picky"}, "model_types": ["nn", "lightgbm"]}
    assert problem(both, {"picky_knob": 2}) \
        == f"--params, {manifest} (picky): tree_device is 'gpu' but the run has no GPU (devices is empty)"
    assert not (tmp_path / "out").exists()


def test_a_default_that_fails_names_the_manifest_where_it_would_be_set(pm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "watcher_output").write_text("")  # in the way of the default output_dir
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"params": {"model_types": ["nn"], "devices": "cpu", "progress": False,
                                               "executors": {"nn": "reversing"}}}))
    with pytest.raises(OutputDirError) as excinfo:
        run_compare_models(load_manifest(manifest, None, pm).params, pm)
    assert str(excinfo.value) == (f"{manifest}::$.params.output_dir (the default): watcher_output exists and is "
                                  "not a directory")


def test_a_fold_error_names_the_data_file_as_it_was_given(pm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "five.csv").write_text("a,y\n" + "".join(f"{i},{i * i}\n" for i in range(5)))
    with pytest.raises(DataError, match=r"^d/five.csv: 5 rows cannot make 3 folds"):
        run_compare_models(_params(pm, tmp_path, data={"path": "d/five.csv", "target": "y"}), pm)


def test_the_storage_password_is_in_no_output(pm, tmp_path, capsys, postgres_server):
    # The test server trusts every local connection, so a URL with a password still opens.
    url = postgres_server.create_database("redacted").replace("postgres@", "postgres:secretpw@")
    summary = run_compare_models(_params(pm, tmp_path, trials=2, storage=url), pm)
    shown = url.replace(":secretpw@", ":***@")
    assert summary["storage"] == summary["params"]["storage"] == shown
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["params"]["storage"] == shown
    for name in ("summary.json", "report.html", "trials.jsonl"):
        assert "secretpw" not in (tmp_path / "out" / name).read_text()
    assert "secretpw" not in capsys.readouterr().out
