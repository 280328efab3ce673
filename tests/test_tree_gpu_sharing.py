"""xgboost_per_gpu: XGBoost trials share a GPU inside one pool, CatBoost trials never share one, and
the pool's hold on each GPU's lease keeps every other executor and process off that GPU.

There is no GPU here: the GPU trials fail fast (no CUDA), which is enough, because what these tests
check is which trials were on one GPU at once. The workers record that themselves: the "ledger"
fault appends each GPU trial's entry and exit to one file, in the order they happened, so an overlap
shows without any clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from watcher_plugins import faults
from watcher_plugins.devices import available_cores
from watcher_plugins.errors import ExecutorError, ManifestError
from watcher_plugins.executor import RunContext
from watcher_plugins.lease import GpuLease
from watcher_plugins.manifest import load_manifest
from watcher_plugins.records import DataRef, TrialJob
from watcher_plugins.tree_parallel.executor import TreeParallelExecutor
from watcher_plugins.tree_parallel.placement import WorkerPlacement
from watcher_plugins.tree_parallel.pool import PoolSettings, TreeTrialPool
from watcher_plugins.tree_parallel.trial import sample_params

DATA = DataRef(embedded="survivors", rows=1500)
FAST = {"tree_rounds": 20, "tree_early_stopping_rounds": 5}
TRY_LEASE = """
import sys
from watcher_plugins.errors import LeaseTimeout
from watcher_plugins.lease import GpuLease
try:
    GpuLease(0, timeout=0.5).acquire()
except LeaseTimeout as exc:
    print(exc)
    sys.exit(3)
print("took GPU 0")
"""


@pytest.fixture
def tree_libraries(monkeypatch):
    for lib in ("catboost", "lightgbm", "xgboost", "optuna"):
        pytest.importorskip(lib)
    monkeypatch.delenv(faults.ENV, raising=False)


@pytest.fixture
def inject(tree_libraries, inject):
    """conftest's ``inject``, once the tree libraries are there."""
    return inject


def _job(model_type: str, trial: int) -> TrialJob:
    return TrialJob(model_type, trial, sample_params(model_type, trial, 5), DATA, 2, seed=5)


def _executor(tmp_path: Path, lease_timeout_s: float = 600.0, lease_dir=None, **params) -> TreeParallelExecutor:
    context = RunContext(output_dir=tmp_path, devices=[0], lease_timeout_s=lease_timeout_s, lease_dir=lease_dir)
    return TreeParallelExecutor({**FAST, "tree_device": "gpu", **params}, context)


def _two_gpu_workers_fit():
    if len(available_cores()) < 2:
        pytest.skip("two GPU workers need two cores of their own")


def _entries(ledger: Path) -> list[dict]:
    return [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []


def _wait_for_entries(ledger: Path, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(e["event"] == "enter" for e in _entries(ledger)) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def _replay(ledger: Path) -> tuple[dict, list[str]]:
    """Replay the ledger in order: the most trials of each model type inside each GPU at once, and
    every entry that broke the sharing rules (a CatBoost trial beside any other GPU trial)."""
    inside: dict[int, list[tuple]] = defaultdict(list)
    most: dict[int, Counter] = defaultdict(Counter)
    broken = []
    for e in _entries(ledger):
        here, key = inside[e["gpu"]], (e["model_type"], e["trial"], e["pid"])
        if e["event"] == "leave":
            here.remove(key)
            continue
        if here and (e["model_type"] == "catboost" or any(m == "catboost" for m, _, _ in here)):
            broken.append(f"{e['model_type']} trial {e['trial']} entered GPU {e['gpu']} beside {here}")
        here.append(key)
        for model_type, n in Counter(m for m, _, _ in here).items():
            most[e["gpu"]][model_type] = max(most[e["gpu"]][model_type], n)
    assert not any(inside.values()), f"trials never left: {dict(inside)}"
    return most, broken


def test_catboost_has_its_gpu_alone_and_at_most_k_xgboost_trials_share_it(tmp_path, inject):
    # Four workers on GPU 0 and k=3: the pool itself must keep the fourth from a fourth XGBoost trial
    # and keep all of them off the GPU while a CatBoost trial is on it.
    ledger = str(tmp_path / "ledger.jsonl")
    xgb = {"ledger": ledger, "rendezvous": 3, "hold_s": 0.3}  # the first three wait for each other
    cat = {"ledger": ledger, "hold_s": 0.3}
    jobs = []
    for t in range(6):  # interleaved, as compare_models sends a mixed batch
        if t < 3:
            jobs.append(inject(_job("catboost", t), cat))
        if t < 2:
            jobs.append(_job("lightgbm", t))
        jobs.append(inject(_job("xgboost", t), xgb))
    cores = available_cores()
    placements = [WorkerPlacement(i, 0 if i < 4 else None, (cores[i % len(cores)],)) for i in range(5)]
    pool = TreeTrialPool(placements, PoolSettings(rounds=20, early_stopping_rounds=5, xgboost_per_gpu=3))
    try:
        results = pool.run(jobs)
        assert pool.leases_held() == []  # not between batches
    finally:
        pool.close()
    most, broken = _replay(Path(ledger))
    assert broken == []
    assert most[0]["xgboost"] == 3 and most[0]["catboost"] == 1
    entered = Counter((e["model_type"], e["trial"]) for e in _entries(Path(ledger)) if e["event"] == "enter")
    assert entered == Counter({("catboost", t): 1 for t in range(3)} | {("xgboost", t): 1 for t in range(6)})
    assert len(results) == 2 * len(jobs)
    assert all(r.info["worker_gpu"] == 0 for r in results if r.model_type != "lightgbm")
    assert all(r.status == "ok" for r in results if r.model_type == "lightgbm")


def test_a_gpu_the_pool_shares_is_leased_to_no_other_executor_or_process(tmp_path, inject):
    _two_gpu_workers_fit()
    ledger, gate = tmp_path / "ledger.jsonl", tmp_path / "gate"
    fault = {"ledger": str(ledger), "gate": str(gate)}  # both trials stay on GPU 0 until the gate opens
    sharing = [inject(_job("xgboost", t), fault) for t in range(2)]
    seen: dict = {}
    with _executor(tmp_path, tree_parallel_workers=2, xgboost_per_gpu=2) as ex:
        assert [p.gpu for p in ex.placements] == [0, 0]

        def meanwhile():
            try:
                _wait_for_entries(ledger, 2)
                seen["held"] = ex.pool.leases_held()
                seen["process"] = subprocess.run([sys.executable, "-c", TRY_LEASE], capture_output=True,
                                                 text=True, timeout=120)
                with _executor(tmp_path / "second", lease_timeout_s=0.5) as other:
                    seen["executor"] = other.run_batch([_job("xgboost", 9)])
            finally:
                gate.touch()

        prober = threading.Thread(target=meanwhile)
        prober.start()
        results = ex.run_batch(sharing)
        prober.join()
        assert ex.pool.leases_held() == []
        with GpuLease(0, timeout=0.5):  # free again once the batch is done, the pool still open
            pass
    holder = f"held by pid {os.getpid()}"
    process = seen["process"]
    assert process.returncode == 3, process.stdout + process.stderr  # it could not take GPU 0
    assert holder in process.stdout and "tree_parallel pool" in process.stdout
    assert [r.status for r in seen["executor"]] == ["fail", "fail"]
    assert all(holder in r.error and "tree_parallel pool" in r.error for r in seen["executor"])
    assert seen["held"] == [0] and len(results) == 4
    most, broken = _replay(ledger)
    assert most[0]["xgboost"] == 2 and broken == []  # while the two XGBoost trials shared GPU 0


def test_sharing_trials_that_cannot_have_the_lease_fail_naming_the_holder(tmp_path, tree_libraries):
    _two_gpu_workers_fit()
    jobs = [_job("xgboost", 0), _job("xgboost", 1), _job("lightgbm", 2)]
    with GpuLease(0, timeout=1, purpose="a test holding GPU 0"):
        with _executor(tmp_path, lease_timeout_s=1.0, tree_parallel_workers=2, xgboost_per_gpu=2) as ex:
            started = time.monotonic()
            results = ex.run_batch(jobs)
            assert time.monotonic() - started < 60  # no hang
            assert ex.pool.leases_held() == []
    xgboost, lightgbm = results[:4], results[4:]
    assert [r.status for r in xgboost] == ["fail"] * 4
    assert all("GPU 0 lease not had within 1s" in r.error and "a test holding GPU 0" in r.error for r in xgboost)
    assert all(r.status == "ok" for r in lightgbm), [r.error for r in lightgbm]


def test_a_lease_directory_that_cannot_be_made_fails_the_gpu_trials_not_the_batch(tmp_path, tree_libraries):
    (tmp_path / "a-file").write_text("")
    with _executor(tmp_path, lease_dir=tmp_path / "a-file" / "leases", tree_parallel_workers=2) as ex:
        results = ex.run_batch([_job("xgboost", 0), _job("lightgbm", 1)])
    assert [r.status for r in results] == ["fail", "fail", "ok", "ok"]
    assert all("cannot create the lease directory" in r.error for r in results[:2])


def test_a_worker_that_dies_while_sharing_its_gpu_is_replaced_and_its_trial_retried(tmp_path, inject):
    _two_gpu_workers_fit()
    marker = tmp_path / "aborted-once"
    jobs = [inject(_job("xgboost", 0), f"abort_once:{marker}"), _job("xgboost", 1), _job("xgboost", 2),
            _job("lightgbm", 3)]
    with _executor(tmp_path, tree_parallel_workers=2, xgboost_per_gpu=2) as ex:
        results = ex.run_batch(jobs)
        assert ex.pool.restarts == 1 and len(ex.pool.worker_pids()) == 2
        assert ex.pool.leases_held() == []
    assert marker.exists()  # it did abort
    assert len(results) == 8
    # The retry ran the trial (here it fails for want of a GPU, never with the abort).
    assert all(r.status == "ok" or "SIGABRT" not in r.error for r in results)
    assert all(r.status == "ok" for r in results if r.model_type == "lightgbm")
    with GpuLease(0, timeout=0.5):
        pass


def test_an_interrupted_batch_frees_the_gpu_lease_at_once(tmp_path, inject):
    _two_gpu_workers_fit()
    gate = tmp_path / "never"  # the XGBoost trial stays on the GPU until it is killed
    on_the_gpu = inject(_job("xgboost", 0), {"ledger": str(tmp_path / "ledger.jsonl"), "gate": str(gate)})
    held_when_interrupted = []

    class Interrupt(Exception):
        pass

    def on_result(result):
        held_when_interrupted.append(ex.pool.leases_held())
        raise Interrupt

    with _executor(tmp_path, tree_parallel_workers=2, xgboost_per_gpu=2) as ex:
        with pytest.raises(Interrupt):
            ex.run_batch([on_the_gpu, _job("lightgbm", 1)], on_result=on_result)
        assert held_when_interrupted == [[0]]
        assert ex.pool.leases_held() == []
        with GpuLease(0, timeout=0.5):
            pass
        assert [r.status for r in ex.run_batch([_job("lightgbm", 2)])] == ["ok", "ok"]  # fresh workers


def test_the_executor_plans_xgboost_per_gpu_workers_and_refuses_zero(tmp_path):
    ex = _executor(tmp_path, tree_parallel_workers=4, xgboost_per_gpu=2)
    gpu_workers = [p for p in ex.placements if p.gpu == 0]
    assert len(gpu_workers) == min(2, len(available_cores())) and ex.settings.xgboost_per_gpu == 2
    with pytest.raises(ExecutorError, match="xgboost_per_gpu"):
        _executor(tmp_path, xgboost_per_gpu=0)


@pytest.mark.parametrize("value, message", [
    (0, "0 is less than the minimum of 1"),
    (-1, "-1 is less than the minimum of 1"),
    ("x", "'x' is not of type 'integer'"),
])
def test_the_schema_refuses_an_xgboost_per_gpu_below_1_or_not_an_integer(tmp_path, plugin_manager, value, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"params": {"xgboost_per_gpu": value}}))
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(path, None, plugin_manager)
    assert excinfo.value.problems == [f"{path}::$.params.xgboost_per_gpu: {message}"]
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(None, json.dumps({"xgboost_per_gpu": value}), plugin_manager)
    assert excinfo.value.problems == [f"--params::$.xgboost_per_gpu: {message}"]


def test_the_schema_default_is_one_gpu_worker_per_gpu(plugin_manager):
    assert load_manifest(None, None, plugin_manager).params["xgboost_per_gpu"] == 1


def test_results_are_the_same_with_xgboost_per_gpu_1_or_2(tmp_path, tree_libraries):
    # No GPU here, so the GPU trials' results are their errors (CatBoost's text depends on whether its
    # process failed to start CUDA before, so only its status is compared); LightGBM's are R^2 from
    # GPU and CPU workers alike.
    _two_gpu_workers_fit()
    jobs = [_job(m, t) for t in range(3) for m in ("catboost", "lightgbm", "xgboost")]
    by_k = {}
    for k in (1, 2):
        with _executor(tmp_path, tree_parallel_workers=2, xgboost_per_gpu=k) as ex:
            assert sum(p.gpu == 0 for p in ex.placements) == k
            by_k[k] = [(r.model_type, r.trial_number, r.fold_idx, r.status, r.score,
                        r.error if r.model_type != "catboost" else None) for r in ex.run_batch(jobs)]
    assert by_k[2] == by_k[1]
    assert {s for m, _, _, s, _, _ in by_k[1] if m == "lightgbm"} == {"ok"}
