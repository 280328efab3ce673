"""The nn_batch executor as compare_models uses it: one FoldResult per fold whatever happens, crashed
workers replaced and their fits retried, persistent or per-batch workers, and no torch in the host."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from watcher_plugins import faults
from watcher_plugins.executor import RunContext
from watcher_plugins.lease import GpuLease
from watcher_plugins.nn_batch.executor import NNBatchExecutor
from watcher_plugins.orphans import processes_with_environment
from watcher_plugins.records import STATUS_FAIL, STATUS_OK, DataRef, TrialJob

ROOT = Path(__file__).resolve().parent.parent
DATA = DataRef(embedded="survivors", rows=400)
PARAMS = {"nn_max_epochs": 10, "nn_patience": 4, "n_concurrent_nn": 4}


def trials(n: int, folds: int = 2) -> list[TrialJob]:
    return [TrialJob("nn", t, {"hidden_layers": [16, 8] if t % 2 else [8], "lr": 1e-2, "weight_decay": 1e-5,
                               "dropout": 0.1 * (t % 2)}, DATA, folds, 3) for t in range(n)]


def context(tmp_path: Path, **kwargs) -> RunContext:
    return RunContext(output_dir=tmp_path, devices=kwargs.pop("devices", []), lease_dir=tmp_path / "leases", **kwargs)


def test_every_fold_gets_one_result_in_order_and_callbacks(tmp_path):
    seen = []
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        results = executor.run_batch(trials(3), on_result=seen.append)
        assert executor.last_batch_summaries[0]["strategy"] == "fused"
    assert [(r.trial_number, r.fold_idx) for r in results] == [(t, f) for t in range(3) for f in range(2)]
    assert all(r.status == STATUS_OK and r.model_type == "nn" and isinstance(r.score, float) for r in results)
    assert sorted((r.trial_number, r.fold_idx) for r in seen) == [(t, f) for t in range(3) for f in range(2)]
    assert (tmp_path / "logs" / "nn_worker-cpu.log").exists()


def test_a_long_batch_reports_increasing_progress_from_the_workers_share_done(tmp_path):
    fractions: list[float] = []
    params = {**PARAMS, "nn_max_epochs": 1500, "nn_patience": 1500}
    with NNBatchExecutor(params, context(tmp_path)) as executor:
        executor.progress_callback = fractions.append
        results = executor.run_batch(trials(2))
    assert all(r.status == STATUS_OK for r in results)
    assert len(fractions) >= 2, fractions
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0]
    assert all(0 < f <= 1 for f in fractions)


def test_persistent_worker_serves_every_batch_and_per_batch_workers_do_not(tmp_path):
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        executor.run_batch(trials(1))
        pid = executor._slots[0].worker.info["pid"]
        executor.run_batch(trials(1))
        assert executor._slots[0].worker.info["pid"] == pid
        assert executor._slots[0].worker.info["tree_libraries_loaded"] == []
    with NNBatchExecutor({**PARAMS, "persistent_workers": False}, context(tmp_path)) as executor:
        assert executor.run_batch(trials(1))[0].status == STATUS_OK
        assert executor._slots[0].worker is None  # stopped after its batch


def test_crashed_worker_is_replaced_and_its_fits_retried(tmp_path, monkeypatch):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(faults.ENV, faults.encode(nn_crash_on_trial=1, nn_crash_once_marker=str(marker)))
    with NNBatchExecutor(PARAMS, context(tmp_path, trial_retries=1)) as executor:
        results = executor.run_batch(trials(3))
    assert marker.exists()
    assert [r.status for r in results] == [STATUS_OK] * 6


def assert_only_trial_1_failed(results, *error_parts: str) -> None:
    """Of trials(3)'s 2 folds each: trials 0 and 2 ok, both folds of trial 1 failed with these words."""
    by_trial = {(r.trial_number, r.fold_idx): r for r in results}
    assert all(by_trial[(t, f)].status == STATUS_OK for t in (0, 2) for f in range(2))
    for fold in range(2):
        failed = by_trial[(1, fold)]
        assert failed.status == STATUS_FAIL
        assert all(part in failed.error for part in error_parts), failed.error


def test_fit_that_always_kills_its_worker_fails_with_the_reason_and_others_complete(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, faults.encode(nn_crash_on_trial=1))
    with NNBatchExecutor(PARAMS, context(tmp_path, trial_retries=1)) as executor:
        results = executor.run_batch(trials(3))
    assert_only_trial_1_failed(results, "exited with code 17", "tried 2 times")
    assert all(r.score is None for r in results if r.trial_number == 1)


def test_a_worker_that_stops_answering_is_killed_and_its_fits_fail_after_retries(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, faults.encode(nn_hang_on_trial=1))
    params = {**PARAMS, "nn_worker_silence_timeout_s": 10}  # well above a healthy fit here
    with NNBatchExecutor(params, context(tmp_path, trial_retries=1)) as executor:
        results = executor.run_batch(trials(3))
    assert_only_trial_1_failed(results, "sent nothing for 10s", "tried 2 times")


def test_fatal_cuda_error_restarts_the_worker_then_fails_the_trial(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, faults.encode(nn_cuda_error_on_trial=0))
    with NNBatchExecutor(PARAMS, context(tmp_path, trial_retries=1)) as executor:
        results = executor.run_batch(trials(2))
    assert [r.status for r in results] == [STATUS_FAIL, STATUS_FAIL, STATUS_OK, STATUS_OK]
    assert "cuda_error" in results[0].error and "illegal memory access" in results[0].error


def test_invalid_trial_params_fail_that_trial_only(tmp_path):
    jobs = trials(2)
    jobs[0] = TrialJob("nn", 0, {"hidden_layers": [], "lr": 1e-2}, DATA, 2, 3)
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        results = executor.run_batch(jobs)
    assert [r.status for r in results] == [STATUS_FAIL, STATUS_FAIL, STATUS_OK, STATUS_OK]
    assert results[0].error.startswith("invalid trial: $.params.hidden_layers: expected a list of 1 to"), \
        results[0].error


def test_gpu_that_cannot_be_had_fails_every_fold_with_the_holder(tmp_path):
    with GpuLease(0, tmp_path / "leases", timeout=5, purpose="a tree worker"):
        with NNBatchExecutor(PARAMS, context(tmp_path, devices=[0], lease_timeout_s=0.3)) as executor:
            results = executor.run_batch(trials(2))
    assert len(results) == 4 and all(r.status == STATUS_FAIL for r in results)
    assert all("a tree worker" in r.error for r in results)


def test_close_stops_a_worker_still_waiting_for_its_gpu_lease(tmp_path):
    # An interrupt while the worker waits for its lease: close() kills it there, so it never goes on to
    # train for a closed executor, and the batch ends with every fold failed (before the fix, close()
    # waited out its 60 s join and the worker and its thread lived on).
    import threading

    done = {}
    with GpuLease(0, tmp_path / "leases", timeout=5, purpose="a tree worker"):
        executor = NNBatchExecutor(PARAMS, context(tmp_path, devices=[0], lease_timeout_s=120))
        batch = threading.Thread(target=lambda: done.update(results=executor.run_batch(trials(2))), daemon=True)
        batch.start()
        while not executor._slots[0].starting:
            time.sleep(0.05)
        worker = executor._slots[0].worker
        time.sleep(1.0)  # the worker is up and waiting for the lease this test holds
        executor.close()
        batch.join(timeout=30)
    assert not batch.is_alive()
    assert not worker.alive and executor._slots[0].worker is None
    assert len(done["results"]) == 4 and all(r.status == STATUS_FAIL for r in done["results"])


def test_host_process_does_not_import_torch():
    code = ("import sys; from watcher_plugins.manager import WatcherPluginManager; pm = WatcherPluginManager(); "
            "pm.load_plugins(entry_points_too=False); cls = pm.get_executors()['nn_batch'].load(); "
            "assert cls.__name__ == 'NNBatchExecutor'; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("model_type", ["catboost"])
def test_other_model_types_are_refused_per_trial(tmp_path, model_type):
    job = TrialJob(model_type, 0, {"depth": 4}, DATA, 2, 3)
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        results = executor.run_batch([job])
    assert [r.status for r in results] == [STATUS_FAIL, STATUS_FAIL] and "'nn' trials only" in results[0].error


class _Interrupt(Exception):
    """Raised from SIGALRM in the main thread, as Ctrl-C would raise KeyboardInterrupt."""


def test_processes_are_found_by_a_marker_in_their_environment():
    # The check the tests below rely on to say that no worker outlived its executor: it must see one.
    marker = uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "WATCHER_TEST_MARKER": marker})
    try:
        assert processes_with_environment(marker) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert processes_with_environment(marker) == []


@pytest.fixture
def worker_stops(monkeypatch) -> list[str]:
    """What happens to live NN workers as they are stopped, in order: "asked" (sent shutdown), "killed"."""
    from watcher_plugins.nn_batch.client import WorkerProcess

    events: list[str] = []
    send, kill = WorkerProcess.send, WorkerProcess.kill

    def recording_send(self, obj):
        if obj.get("command") == "shutdown":
            events.append("asked")
        return send(self, obj)

    def recording_kill(self):
        if self.alive:
            events.append("killed")
        return kill(self)

    monkeypatch.setattr(WorkerProcess, "send", recording_send)
    monkeypatch.setattr(WorkerProcess, "kill", recording_kill)
    return events


def run_interrupted(tmp_path: Path, jobs: list[TrialJob], after_s: int = 4) -> NNBatchExecutor:
    """A batch that would train for hours, interrupted ``after_s`` seconds in from the main thread (as
    Ctrl-C raises KeyboardInterrupt there) and left through the executor's ``with``; the executor."""
    def interrupt(signum, frame):
        raise _Interrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(after_s)
    try:
        with pytest.raises(_Interrupt):
            with NNBatchExecutor({**PARAMS, "nn_max_epochs": 10**6, "nn_patience": 10**6, "n_concurrent_nn": 1},
                                 context(tmp_path)) as executor:
                executor.run_batch(jobs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return executor


def test_an_interrupted_batch_leaves_no_worker_behind(tmp_path, monkeypatch):
    marker = uuid.uuid4().hex
    monkeypatch.setenv("WATCHER_TEST_MARKER", marker)  # inherited by every worker the executor starts
    long_jobs = [TrialJob("nn", t, {"hidden_layers": [64, 32], "lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0},
                          DATA, 2, 3) for t in range(3)]
    run_interrupted(tmp_path, long_jobs)
    time.sleep(3)  # a respawned worker would be up by now
    assert processes_with_environment(marker) == []


def test_an_interrupted_batch_kills_its_busy_worker_instead_of_letting_it_finish(tmp_path, worker_stops):
    # After Ctrl-C or SIGTERM nothing reads what the worker would still train: asking it to shut down
    # waits SHUTDOWN_WAIT_S (15 s) for its batch first, longer than docker stop's grace period (10 s).
    executor = run_interrupted(tmp_path, trials(2))
    assert worker_stops == ["killed"]
    assert executor._slots[0].worker is None


def test_an_idle_worker_is_asked_to_shut_down(tmp_path, worker_stops):
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        executor.run_batch(trials(1))
        worker = executor._slots[0].worker
    assert worker_stops == ["asked"] and worker.process.returncode == 0  # it said bye and exited by itself


def test_a_trial_number_given_twice_fails_the_second_job_and_the_batch_ends(tmp_path):
    jobs = trials(2) + [trials(1)[0]]  # trial 0 again
    done = {}
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        batch = threading.Thread(target=lambda: done.update(results=executor.run_batch(jobs)), daemon=True)
        batch.start()
        batch.join(timeout=120)  # a hang, not a slow batch: this one takes seconds
        assert not batch.is_alive(), "the batch waits for results that never come"
    results = done["results"]
    assert [(r.trial_number, r.fold_idx, r.status) for r in results] == [
        (0, 0, STATUS_OK), (0, 1, STATUS_OK), (1, 0, STATUS_OK), (1, 1, STATUS_OK),
        (0, 0, STATUS_FAIL), (0, 1, STATUS_FAIL)]
    assert results[4].error == "invalid trial: trial 0 appears more than once in this batch"


def test_with_no_retries_a_trial_that_kills_its_worker_fails_alone(tmp_path, monkeypatch):
    # One architecture, so that trials 0 and 1 start in one pack: the crash ends a request of three
    # trials, none finished. Which one caused it is not known, so none fails for it: each runs again
    # alone, and only trial 1's own crash fails it.
    monkeypatch.setenv(faults.ENV, faults.encode(nn_crash_on_trial=1))
    jobs = [TrialJob("nn", t, {"hidden_layers": [8], "lr": 1e-2}, DATA, 2, 3) for t in range(3)]
    with NNBatchExecutor(PARAMS, context(tmp_path, trial_retries=0)) as executor:
        results = executor.run_batch(jobs)
    assert_only_trial_1_failed(results, "exited with code 17", "trial_retries=0")


def test_a_batch_too_long_for_one_request_line_goes_in_several(tmp_path, monkeypatch):
    # The worker refuses a line over its limit (4 MiB: thousands of trials). Here the host believes
    # the limit is half of what the 4 trials' request takes, so they go in 2 or more requests of whole
    # trials (the worker's own limit is unchanged); every fold still gets its result, in order.
    from watcher_plugins.nn_batch import protocol
    from watcher_plugins.nn_batch.client import train_batch_request
    from watcher_plugins.nn_batch.executor import fit_jobs

    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        whole = train_batch_request([fit for job in trials(4) for fit in fit_jobs(job)], executor.settings)
    monkeypatch.setattr(protocol, "MAX_LINE_BYTES", len(json.dumps(whole)) // 2)
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        results = executor.run_batch(trials(4))
        requests = executor.last_batch_summaries
    assert len(requests) > 1
    assert [(r.trial_number, r.fold_idx) for r in results] == [(t, f) for t in range(4) for f in range(2)]
    assert all(r.status == STATUS_OK for r in results)


def test_a_number_too_big_for_a_float_fails_that_trial_only(tmp_path):
    jobs = trials(2)
    jobs[0] = TrialJob("nn", 0, {"hidden_layers": [8], "lr": 10**400}, DATA, 2, 3)
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        results = executor.run_batch(jobs)
    assert [r.status for r in results] == [STATUS_FAIL, STATUS_FAIL, STATUS_OK, STATUS_OK]
    assert results[0].error.startswith("invalid trial: $.params.lr: expected a number > 0"), results[0].error


def test_hidden_layers_may_be_a_tuple_from_python(tmp_path):
    jobs = [TrialJob("nn", 0, {"hidden_layers": (8, 4), "lr": 1e-2}, DATA, 2, 3),
            TrialJob("nn", 1, {"hidden_layers": (8, 0), "lr": 1e-2}, DATA, 2, 3)]
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        results = executor.run_batch(jobs)
    assert [r.status for r in results] == [STATUS_OK, STATUS_OK, STATUS_FAIL, STATUS_FAIL]
    assert results[2].error == ("invalid trial: $.params.hidden_layers: expected a list of 1 to 16 integers in "
                                "1..65536, got [8, 0]")


def test_an_internal_error_after_some_results_is_not_called_a_refusal(tmp_path):
    # Trial 0's file is missing: its folds fail with results of their own. Trial 1's file makes the data
    # reader raise what is no DataError (JSON nested too deep), which ends the worker's batch with an
    # internal_error line: trial 2, valid, fails with it.
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    params = {"hidden_layers": [8], "lr": 1e-2}
    jobs = [TrialJob("nn", 0, params, DataRef(path=str(tmp_path / "missing.csv"), target="y"), 2, 3),
            TrialJob("nn", 1, params, DataRef(path=str(deep), target="y"), 2, 3),
            TrialJob("nn", 2, params, DATA, 2, 3)]
    with NNBatchExecutor(PARAMS, context(tmp_path)) as executor:
        results = executor.run_batch(jobs)
    assert all(r.status == STATUS_FAIL for r in results)
    assert "data file not found" in results[0].error
    for result in results[2:]:
        assert "refused" not in result.error, result.error
        assert result.error.startswith("the NN worker's batch failed after 2 of its 6 fits had a result: "
                                       "internal_error: RecursionError"), result.error


@pytest.mark.parametrize("huge", [{"nn_worker_silence_timeout_s": 1e10}, {"lease_timeout_s": 1e10}],
                         ids=["silence", "lease"])
def test_a_huge_timeout_means_no_timeout(tmp_path, huge):
    # The schema allows any positive number; queue.get refuses one above threading.TIMEOUT_MAX.
    params = {**PARAMS, **{k: v for k, v in huge.items() if k.startswith("nn_")}}
    run_context = context(tmp_path, **{k: v for k, v in huge.items() if not k.startswith("nn_")})
    with NNBatchExecutor(params, run_context) as executor:
        results = executor.run_batch(trials(1))
    assert [r.status for r in results] == [STATUS_OK, STATUS_OK], [r.error for r in results]


def test_a_worker_that_does_not_die_of_sigkill_is_left_behind_with_a_warning(tmp_path, monkeypatch, caplog):
    # A worker stuck in the GPU driver (uninterruptible) outlives SIGKILL. No such process can be made on
    # the CPU: here, once killed, a worker's wait never sees it end (it really is killed).
    from watcher_plugins import child_process

    monkeypatch.setattr(child_process, "KILL_WAIT_S", 0.5)
    killed: set[int] = set()
    test_over = threading.Event()
    real_kill, real_wait = subprocess.Popen.kill, subprocess.Popen.wait

    def kill(process):
        killed.add(process.pid)
        real_kill(process)

    def wait(process, timeout=None):
        if process.pid not in killed:
            return real_wait(process, timeout)
        test_over.wait(timeout)  # no timeout: as long as the test lasts, for "forever"
        raise subprocess.TimeoutExpired(process.args, timeout)

    monkeypatch.setattr(subprocess.Popen, "kill", kill)
    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    monkeypatch.setenv(faults.ENV, faults.encode(nn_hang_on_trial=0))
    params = {**PARAMS, "nn_worker_silence_timeout_s": 3}
    executor = NNBatchExecutor(params, context(tmp_path, trial_retries=0))
    done = {}
    batch = threading.Thread(target=lambda: done.update(results=executor.run_batch(trials(1))), daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="watcher_plugins.child_process"):
            batch.start()
            batch.join(timeout=60)  # a hang, not a slow batch: this one takes seconds
            assert not batch.is_alive(), "the batch hangs on a worker that does not die"
            executor.close()
    finally:
        test_over.set()
    assert [r.status for r in done["results"]] == [STATUS_FAIL, STATUS_FAIL]
    assert "sent nothing for 3s" in done["results"][0].error
    assert any("did not exit within 0.5s of SIGKILL" in record.getMessage() for record in caplog.records)


def test_close_while_a_worker_starts_leaves_none_behind(tmp_path, monkeypatch):
    # close() between the slot's taking the worker in and its process starting: widened here by a slow
    # step just before Popen (normally a millisecond).
    from watcher_plugins import child_process

    marker = uuid.uuid4().hex
    monkeypatch.setenv("WATCHER_TEST_MARKER", marker)
    real_pin = child_process.pin_environment

    def slow_pin(env, gpu):
        time.sleep(2)
        return real_pin(env, gpu)

    monkeypatch.setattr(child_process, "pin_environment", slow_pin)
    executor = NNBatchExecutor(PARAMS, context(tmp_path))
    done = {}
    batch = threading.Thread(target=lambda: done.update(results=executor.run_batch(trials(1))), daemon=True)
    batch.start()
    try:
        while not executor._slots[0].starting:
            time.sleep(0.01)
        executor.close()
        batch.join(timeout=120)
        assert not batch.is_alive()
        assert [r.status for r in done["results"]] == [STATUS_FAIL, STATUS_FAIL]
        assert processes_with_environment(marker) == []
    finally:
        for pid in processes_with_environment(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_silent_crash_is_not_reported_with_an_older_workers_log(tmp_path, monkeypatch):
    log = tmp_path / "logs" / "nn_worker-cpu.log"  # shared by every worker on the CPU, in every run
    log.parent.mkdir()
    log.write_text("Traceback (most recent call last):\nRuntimeError: an earlier run's error\n")
    monkeypatch.setenv(faults.ENV, faults.encode(nn_crash_on_trial=0))  # os._exit: no last words
    with NNBatchExecutor(PARAMS, context(tmp_path, trial_retries=0)) as executor:
        results = executor.run_batch(trials(1))
    assert [r.status for r in results] == [STATUS_FAIL, STATUS_FAIL]
    assert "exited with code 17" in results[0].error
    assert "an earlier run's error" not in results[0].error, results[0].error
    assert "an earlier run's error" in log.read_text()  # appended to, not replaced


def test_busy_workers_are_shut_down_together(tmp_path, monkeypatch, worker_stops):
    # Two workers (as on two GPUs; the executor makes one slot on the CPU, so the slots are made here),
    # each busy with a batch that would train for hours: each is given SHUTDOWN_WAIT_S to finish, at once.
    # One after another, the second would be asked only after the first had been waited for and killed.
    from watcher_plugins.nn_batch import client
    from watcher_plugins.nn_batch.client import train_batch_request
    from watcher_plugins.nn_batch.executor import _WorkerSlot, fit_jobs, shutdown_slots
    from watcher_plugins.nn_batch.protocol import BatchSettings

    monkeypatch.setattr(client, "SHUTDOWN_WAIT_S", 2.0)
    slots = [_WorkerSlot(None, context(tmp_path), threading.Event()) for _ in range(2)]
    long_batch = train_batch_request(fit_jobs(trials(1)[0]), dataclasses.replace(
        BatchSettings.defaults(), n_concurrent=1, strategy="serial", max_epochs=10**6, patience=10**6))
    workers = []
    try:
        for slot in slots:
            workers.append(slot.ensure_started())
            workers[-1].send(long_batch)
        shutdown_slots(slots)
    finally:
        for worker in workers:
            worker.kill()
    assert not any(worker.alive for worker in workers)
    assert worker_stops == ["asked", "asked", "killed", "killed"]
