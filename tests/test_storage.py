"""Storage: stale trials of a killed run are retried, PostgreSQL shared by two agents, storage errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from test_compare_models import ReversingExecutor, TestExecutors  # noqa: F401  (a registered test executor)

from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.errors import StorageError, StorageLost
from watcher_plugins.manifest import load_manifest
from watcher_plugins.records import DataRef
from watcher_plugins.storage import RETRY_OF, StudyStore, _requeue


@pytest.fixture
def pm(plugin_manager):
    plugin_manager.register(TestExecutors())
    ReversingExecutor.batches = []
    ReversingExecutor.interrupt_on_batch = None
    return plugin_manager


def _params(pm, tmp_path, **override):
    base = {"model_types": ["nn"], "trials": 4, "ask_batch_size": 2, "folds": 2, "devices": "cpu",
            "data": {"embedded": "survivors", "rows": 200}, "output_dir": str(tmp_path / "out"),
            "progress": False, "executors": {"nn": "reversing"}, "heartbeat_interval_s": 1}
    base.update(override)
    return load_manifest(None, json.dumps(base), pm).params


def test_trials_of_a_killed_run_go_stale_and_their_params_are_asked_again(pm, tmp_path):
    params = _params(pm, tmp_path)
    (tmp_path / "out").mkdir()
    store = StudyStore.open(params, tmp_path / "out", DataRef.from_param(params["data"]))
    # The definition compare_models gives it: the test executor's result param and tag, and the compute.
    study = store.study("nn", seed=params["seed"],
                        result_params={"nn_max_epochs": params["nn_max_epochs"], "scoring": "v2", "compute": "cpu"})
    orphan = store.ask(study)  # asked, heartbeat recorded, then its agent "dies": never told
    orphan_params = {"lr": orphan.suggest_float("lr", 1e-4, 3e-2, log=True)}
    time.sleep(3.5)  # past the grace period (2 x heartbeat_interval_s; SQLite clocks tick in whole seconds)
    run_compare_models(params, pm)
    trials = optuna.load_study(study_name="compare_models-nn", storage=store.url).get_trials()
    assert trials[0].state.name == "FAIL"
    retries = [t for t in trials if t.user_attrs.get(RETRY_OF) == 0]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params["lr"] == orphan_params["lr"]
    assert len(trials) == 5  # four counted trials; the retried FAIL does not count
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)


def _open_nn_study(params, output_dir):
    store = StudyStore.open(params, output_dir, DataRef.from_param(params["data"]))
    # The definition compare_models gives it: the test executor's result param and tag, and the compute.
    return store, store.study("nn", seed=params["seed"], result_params={
        "nn_max_epochs": params["nn_max_epochs"], "scoring": "v2", "compute": "cpu"})


def test_an_agent_that_beats_often_does_not_take_a_slower_agents_trial_for_stale(pm, tmp_path):
    # Agent A beats every 30 s; agent B, on the same study, every second. After 3.5 s of A's silence its
    # trial is alive by A's interval: B must not fail it (and so have it trained twice).
    (tmp_path / "out").mkdir()
    store_a, study_a = _open_nn_study(_params(pm, tmp_path, heartbeat_interval_s=30), tmp_path / "out")
    store_b, study_b = _open_nn_study(_params(pm, tmp_path, heartbeat_interval_s=1), tmp_path / "out")
    trial = store_a.ask(study_a)
    time.sleep(3.5)  # past B's grace period (2 x 1 s; SQLite clocks tick in whole seconds)
    store_b.fail_stale(study_b)
    assert study_b.get_trials()[trial.number].state.name == "RUNNING"
    # B's own trial, silent past B's interval, is stale once no running trial's agent beats slower.
    trial_b = store_b.ask(study_b)
    store_a.fail_and_requeue(study_a, trial, "test: A's trial ends")
    time.sleep(3.5)
    store_b.fail_stale(study_b)
    assert study_b.get_trials()[trial_b.number].state.name == "FAIL"


def test_a_trial_failed_as_stale_meanwhile_is_not_recorded_and_the_run_goes_on(pm, tmp_path):
    (tmp_path / "out").mkdir()
    params = _params(pm, tmp_path)
    store, study = _open_nn_study(params, tmp_path / "out")
    trial = store.ask(study)
    trial.suggest_float("lr", 1e-4, 3e-2, log=True)
    other_store, other_study = _open_nn_study(params, tmp_path / "out")
    other_study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # as another agent's stale check does
    assert store.tell(study, trial, {"lr": 1e-3}, 0.5, None, []) is False
    assert study.get_trials()[trial.number].state.name == "FAIL"


def test_a_run_whose_trial_another_agent_failed_as_stale_goes_on_and_finishes_the_study(pm, tmp_path, monkeypatch,
                                                                                           caplog):
    params = _params(pm, tmp_path)
    run_batch = ReversingExecutor.run_batch

    def first_trial_taken_over(self, jobs, on_result=None):
        if len(ReversingExecutor.batches) == 0:  # while the first batch trains, another agent fails trial 0
            study = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
            study.tell(jobs[0].trial_number, state=optuna.trial.TrialState.FAIL)
            _requeue(study, study.get_trials()[jobs[0].trial_number])
        return run_batch(self, jobs, on_result)

    monkeypatch.setattr(ReversingExecutor, "run_batch", first_trial_taken_over)
    with caplog.at_level("WARNING", logger="watcher_plugins.compare_models"):
        summary = run_compare_models(params, pm)
    assert any("nn trial 0 finished, but another agent" in r.getMessage() for r in caplog.records)
    trials = optuna.load_study(study_name="compare_models-nn", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
                               ).get_trials()
    assert trials[0].state.name == "FAIL"
    assert [t.user_attrs.get(RETRY_OF) for t in trials].count(0) == 1  # its params, asked again
    assert summary["leaderboard"][0]["trials_complete"] + summary["leaderboard"][0]["trials_failed"] == 4


def test_the_leaderboard_counts_the_trials_other_agents_still_run(pm, tmp_path, capsys):
    # Another agent (beating every 30 s) runs one of the study's four trials; this one runs the other
    # three and ends first: its leaderboard must not pass for the finished study.
    (tmp_path / "out").mkdir()
    other, other_study = _open_nn_study(_params(pm, tmp_path, heartbeat_interval_s=30), tmp_path / "out")
    other.ask(other_study)
    summary = run_compare_models(_params(pm, tmp_path), pm)
    (row,) = summary["leaderboard"]
    assert (row["trials_complete"] + row["trials_failed"], row["trials_running"]) == (3, 1)
    assert "nn: 1 trial(s) still running in other agents sharing the study" in capsys.readouterr().out


def test_a_wrong_storage_url_fails_before_anything_is_written(pm, tmp_path):
    for url, expected in [("notadb://x", "cannot open Optuna storage notadb://x"),
                          ("postgresql+psycopg://u:secret@127.0.0.1:1/db", "cannot open Optuna storage "
                                                                             "postgresql+psycopg://u:***@127.0.0.1:1/db")]:
        with pytest.raises(StorageError) as excinfo:
            run_compare_models(_params(pm, tmp_path, storage=url), pm)
        assert expected in str(excinfo.value)
        assert "secret" not in str(excinfo.value)
    assert not (tmp_path / "out").exists()
    assert ReversingExecutor.batches == []


def test_a_wrong_storage_url_leaves_no_directory_the_run_made(pm, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(StorageError, match=r"^--params::\$.storage: cannot open Optuna storage notadb://x"):
        run_compare_models(_params(pm, tmp_path, storage="notadb://x", output_dir=str(existing / "new" / "out")), pm)
    assert list(existing.iterdir()) == []  # the directories it made are gone; the one it found stays


def test_a_study_that_cannot_be_opened_takes_back_a_new_output_dir_and_its_database(pm, tmp_path, monkeypatch):
    def refuse(self, model_type, seed, result_params=None):
        raise StorageError("the database refused the study")

    monkeypatch.setattr(StudyStore, "study", refuse)
    with pytest.raises(StorageError, match="refused"):
        run_compare_models(_params(pm, tmp_path, output_dir=str(tmp_path / "new" / "out")), pm)
    assert list(tmp_path.iterdir()) == []  # optuna.db was this run's: its output_dir did not exist before
    (tmp_path / "out").mkdir()
    with pytest.raises(StorageError, match="refused"):
        run_compare_models(_params(pm, tmp_path), pm)
    assert (tmp_path / "out").is_dir()  # from a directory it found, nothing is removed


def test_postgres_storage_runs_and_resumes(pm, tmp_path, postgres_server):
    url = postgres_server.create_database(f"t_{uuid.uuid4().hex[:8]}")
    summary = run_compare_models(_params(pm, tmp_path, storage=url), pm)
    assert summary["leaderboard"][0]["trials_complete"] + summary["leaderboard"][0]["trials_failed"] == 4
    assert not (tmp_path / "out" / "optuna.db").exists()
    ReversingExecutor.batches = []
    run_compare_models(_params(pm, tmp_path, storage=url, trials=5), pm)
    assert ReversingExecutor.batches == [[4]]


def test_a_database_that_goes_down_mid_run_stops_the_run_cleanly(pm, tmp_path, postgres_server):
    from postgres_server import PostgresServer

    server = PostgresServer(postgres_server.pg_bin).start()
    url = server.url()

    class StopDatabase(ReversingExecutor):
        def run_batch(self, jobs, on_result=None):
            results = super().run_batch(jobs, on_result)
            if len(type(self).batches) == 2:
                server.stop()
            return results

    StopDatabase.batches = []
    params = _params(pm, tmp_path, storage=url, storage_retries=1)
    with pytest.raises(StorageLost, match=r"lost the connection to postgresql\+psycopg://postgres@127.0.0.1:\d+/"
                                          r"postgres while .*completed trials are saved") as excinfo:
        run_with_executor(pm, params, StopDatabase)
    assert excinfo.value.exit_code == 1  # a failure of the run, not bad input
    server.start()  # the server comes back: the batch told before the loss is there, nothing half-written
    try:
        trials = optuna.load_study(study_name="compare_models-nn", storage=url).get_trials()
        assert [t.state.name for t in trials[:2]] == ["COMPLETE", "COMPLETE"]
        assert all(t.state.name in ("COMPLETE", "RUNNING") for t in trials)
        assert all("fold_scores" in t.user_attrs for t in trials if t.state.name == "COMPLETE")
    finally:
        server.remove()


def run_with_executor(pm, params, executor_cls):
    from watcher_plugins import hookimpl
    from watcher_plugins.types import WatcherExecutor

    class OneOff:
        @hookimpl
        def watcher_executors(self):
            yield WatcherExecutor(name="one_off", model_types=("nn",), load=lambda: executor_cls)

    pm.register(OneOff())
    return run_compare_models({**params, "executors": {"nn": "one_off"}}, pm)


AGENT = """
import json, sys
sys.path.insert(0, {tests!r})
from watcher_plugins.compare_models import run_compare_models
from watcher_plugins.manager import WatcherPluginManager
from watcher_plugins.manifest import load_manifest
from test_compare_models import TestExecutors, ReversingExecutor
import time
orig = ReversingExecutor.run_batch
def slow(self, jobs, on_result=None):
    time.sleep(0.2)  # keep both agents busy at once
    return orig(self, jobs, on_result)
ReversingExecutor.run_batch = slow
pm = WatcherPluginManager(); pm.load_plugins(TestExecutors(), entry_points_too=False)
params = load_manifest(None, sys.argv[1], pm).params
run_compare_models(params, pm)
print(json.dumps(ReversingExecutor.batches))
"""


def test_two_agents_share_one_study_and_never_run_the_same_trial(tmp_path, postgres_server):
    url = postgres_server.create_database(f"t_{uuid.uuid4().hex[:8]}")
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    procs = []
    for name in ("a", "b"):
        params = {"model_types": ["nn"], "trials": 12, "ask_batch_size": 2, "folds": 2, "devices": "cpu",
                  "data": {"embedded": "survivors", "rows": 200}, "output_dir": str(tmp_path / name),
                  "progress": False, "executors": {"nn": "reversing"}, "storage": url,
                  "lease_dir": str(tmp_path / f"leases-{name}")}
        procs.append(subprocess.Popen([sys.executable, "-c", AGENT.format(tests=tests_dir), json.dumps(params)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    ran = [json.loads(o[0].strip().splitlines()[-1]) for o in outputs]
    numbers_a = [n for batch in ran[0] for n in batch]
    numbers_b = [n for batch in ran[1] for n in batch]
    assert numbers_a and numbers_b, "both agents should have taken part"
    assert not set(numbers_a) & set(numbers_b)
    assert sorted(numbers_a + numbers_b) == list(range(12))
    study = optuna.load_study(study_name="compare_models-nn", storage=url)
    assert [t.state.name for t in study.trials].count("RUNNING") == 0
    # Surplus trials (both agents asked for the last ones at once) are pruned before they sample: no params.
    params_seen = [json.dumps(t.params, sort_keys=True) for t in study.trials if t.state.name != "PRUNED"]
    assert len(set(params_seen)) == len(params_seen)  # the agents' samplers did not draw the same params


def test_a_study_made_on_gpus_is_not_resumed_on_a_cpu_only_host(pm, tmp_path):
    params = _params(pm, tmp_path)
    (tmp_path / "out").mkdir()
    store = StudyStore.open(params, tmp_path / "out", DataRef.from_param(params["data"]))
    study = store.study("nn", seed=params["seed"], result_params={"nn_max_epochs": params["nn_max_epochs"],
                                                                  "scoring": "v2", "compute": "gpu"})
    study.tell(store.ask(study), 0.5)  # a trial trained on the GPUs (an empty study would take the new params)
    with pytest.raises(StorageError, match="compute: stored 'gpu', now 'cpu'"):
        run_compare_models(params, pm)


def test_agents_opening_a_new_database_at_the_same_moment_all_connect(postgres_server, tmp_path):
    # They race to create optuna's tables; the losers must retry, not fail.
    for _ in range(3):
        url = postgres_server.create_database(f"t_{uuid.uuid4().hex[:8]}")
        code = f"from watcher_plugins.storage import _connect; _connect({url!r}, 20)"
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
                 for _ in range(4)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [e[-500:] for e in errors if e]
