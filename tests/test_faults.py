"""The one fault-injection mechanism for tests (watcher_plugins/faults.py): what WATCHER_FAULTS may hold,
and that unset it injects nothing. The faults themselves are made to happen in the workers by
test_nn_oom.py, test_nn_worker.py, test_nn_executor.py, test_tree_faults.py and test_tree_gpu_sharing.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from watcher_plugins import faults
from watcher_plugins.faults import Faults, Ledger, TreeFault


def test_unset_or_empty_injects_nothing():
    assert not Faults.from_env({}).active
    assert not Faults.from_env({faults.ENV: ""}).active
    assert not Faults.from_env({faults.ENV: "{}"}).active
    quiet = Faults()
    quiet.before_pack([SimpleNamespace(key=(0, 0))])  # nothing happens
    sent: list[dict] = []
    with quiet.tree_trial("lightgbm", 0, gpu=None, folds=[0], catboost_gpu_ram_part=None, send=sent.append):
        pass
    assert sent == []


def test_the_env_names_faults_with_their_arguments():
    text = faults.encode(nn_crash_on_trial=1, nn_crash_once_marker="/tmp/m", nn_noise=True,
                         tree_trials={"lightgbm:0": "sleep:1.5", "xgboost:3": {"ledger": "/tmp/l", "rendezvous": 2}})
    got = Faults.from_env({faults.ENV: text})
    assert got.active and got.nn_crash_on_trial == 1 and got.nn_crash_once_marker == "/tmp/m" and got.nn_noise
    assert got.tree_trials == {"lightgbm:0": TreeFault("sleep", "1.5"), "xgboost:3": Ledger("/tmp/l", rendezvous=2)}
    assert faults.trial_key("xgboost", 3) == "xgboost:3"


@pytest.mark.parametrize("value, words", [
    ({"oom_at_concurrency": 1}, "unknown fault(s) ['oom_at_concurrency']"),  # the old WATCHER_NN_FAULTS key
    ({"tree_trials": {"lightgbm:0": "segfault"}}, "'segfault' is not one of"),
    ({"tree_trials": {"lightgbm:0": "sleep"}}, "sleep takes an argument"),
    ({"tree_trials": {"lightgbm:0": "abort:now"}}, "abort takes no argument"),
    ({"tree_trials": {"lightgbm:0": {"gate": "/tmp/g"}}}, "needs ledger"),
    ({"tree_trials": ["lightgbm:0"]}, "tree_trials must map"),
])
def test_a_fault_it_does_not_know_is_an_error(value, words):
    with pytest.raises(ValueError, match="WATCHER_FAULTS") as raised:
        faults.encode(**value)
    assert words in str(raised.value)
    with pytest.raises(ValueError):
        Faults.from_env({faults.ENV: json.dumps(value)})
    with pytest.raises(ValueError, match="must be a JSON object"):
        Faults.from_env({faults.ENV: "[]"})


def test_a_worker_reads_the_env_once(monkeypatch):
    faults.current.cache_clear()
    try:
        monkeypatch.setenv(faults.ENV, faults.encode(nn_hang_on_trial=4))
        assert faults.current().nn_hang_on_trial == 4
        monkeypatch.delenv(faults.ENV)
        assert faults.current().nn_hang_on_trial == 4
    finally:
        faults.current.cache_clear()


def test_tree_faults_apply_to_their_own_trial(capfd):
    chosen = Faults.from_json({"tree_trials": {"lightgbm:1": "stderr:hello", "catboost:0": "bad_reply"}})
    sent: list[dict] = []

    def trial(model_type, number):
        with chosen.tree_trial(model_type, number, gpu=None, folds=[0], catboost_gpu_ram_part=None, send=sent.append):
            pass

    trial("lightgbm", 0)
    trial("xgboost", 1)
    assert capfd.readouterr().err == "" and sent == []
    trial("lightgbm", 1)
    assert capfd.readouterr().err == "hello\n"
    trial("catboost", 0)
    assert [s["result"]["fold_idx"] for s in sent] == ["first"]  # what the protocol's schema refuses


def test_the_ledger_records_entry_and_exit_around_the_trial(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    chosen = Faults.from_json({"tree_trials": {"xgboost:2": {"ledger": str(ledger)}}})
    with chosen.tree_trial("xgboost", 2, gpu=0, folds=[0, 1], catboost_gpu_ram_part=None, send=print):
        inside = [json.loads(line)["event"] for line in ledger.read_text().splitlines()]
    events = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert inside == ["enter"] and [e["event"] for e in events] == ["enter", "leave"]
    assert all(e["gpu"] == 0 and e["model_type"] == "xgboost" and e["trial"] == 2 for e in events)
