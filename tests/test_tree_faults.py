"""Each fault the tree pool must survive, made to happen: a worker that aborts (as from a segfault)
or is killed mid-trial, a trial that raises, and a GPU lease that cannot be had in time."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from watcher_plugins import faults
from watcher_plugins.executor import RunContext
from watcher_plugins.lease import GpuLease
from watcher_plugins.records import DataRef, TrialJob
from watcher_plugins.tree_parallel import slots as slots_module
from watcher_plugins.tree_parallel.executor import TreeParallelExecutor
from watcher_plugins.tree_parallel.libraries import FitSettings
from watcher_plugins.tree_parallel.trial import run_trial

DATA = DataRef(embedded="survivors", rows=1500)
FAST = {"tree_rounds": 30, "tree_early_stopping_rounds": 10}
LGB = {"num_leaves": 15, "learning_rate": 0.1}


@pytest.fixture(autouse=True)
def no_faults_but_the_tests(monkeypatch):
    pytest.importorskip("lightgbm")
    monkeypatch.delenv(faults.ENV, raising=False)



def _job(trial: int, model_type: str = "lightgbm", params=None) -> TrialJob:
    return TrialJob(model_type, trial, dict(LGB if params is None else params), DATA, 3, seed=5)


def _executor(tmp_path: Path, devices=(), retries=2, lease_timeout_s=600.0, **params) -> TreeParallelExecutor:
    context = RunContext(output_dir=tmp_path, devices=list(devices), trial_retries=retries,
                         lease_timeout_s=lease_timeout_s)
    return TreeParallelExecutor({**FAST, "tree_parallel_workers": 2, **params}, context)


def test_a_worker_that_keeps_aborting_fails_its_trial_after_the_retries_and_frees_the_gpu_lease(tmp_path, inject):
    # A GPU-pinned worker takes GPU 0's lease, then dies of SIGABRT inside the trial, three times.
    jobs = [inject(_job(0, model_type="catboost", params={"depth": 4}), "abort"), _job(1), _job(2)]
    with _executor(tmp_path, devices=[0], retries=2, tree_device="gpu") as ex:
        results = ex.run_batch(jobs)
        restarts = ex.pool.restarts
        assert len(ex.pool.worker_pids()) == 2  # the pool was rebuilt
    crashed, others = results[:3], results[3:]
    assert [r.status for r in crashed] == ["fail"] * 3
    assert all("SIGABRT" in r.error and "gave up after 3 attempt(s)" in r.error for r in crashed)
    assert all(r.status == "ok" for r in others)
    assert restarts == 3
    with GpuLease(0, timeout=0.5):  # the OS released the dead worker's lease: no lease left held
        pass


def test_crashes_on_a_cpu_trials_several_folds_count_against_the_trial_not_each_fold(tmp_path, inject):
    # Its folds go out one at a time, to both workers at once; every one aborts. The bound is per trial
    # and per try: retries=1 allows two tries in all, not two per fold, and a try whose two folds both
    # die is one try.
    with _executor(tmp_path, retries=1) as ex:
        results = ex.run_batch([inject(_job(0), "abort"), _job(1)])
        restarts = ex.pool.restarts
        assert len(ex.pool.worker_pids()) == 2
    assert [r.status for r in results[:3]] == ["fail"] * 3
    assert all("SIGABRT" in r.error and "gave up after 2 attempt(s)" in r.error for r in results[:3])
    assert all(r.status == "ok" for r in results[3:])
    # Both workers died in the first try; in the second, the first death ends the trial (a worker still
    # on its other fold is stopped, and replaced too).
    assert restarts in (3, 4)


def test_folds_of_one_try_that_crash_together_cost_the_trial_one_retry(tmp_path, caplog, inject):
    # The two workers take the trial's two folds at once; each dies on its first try of its fold (as
    # when the OOM killer takes several workers). retries=1: that is one crashed try, and the retry
    # trains the trial, with the result it has when nothing crashes.
    crashing = inject(TrialJob("lightgbm", 0, LGB, DATA, 2, seed=5), f"abort_once_per_fold:{tmp_path}")
    with _executor(tmp_path, retries=1) as ex:
        results = ex.run_batch([crashing])
        assert ex.pool.restarts == 2
    assert sorted(p.name for p in tmp_path.glob("folds-*")) == ["folds-0", "folds-1"]
    # Both deaths are in the log: the one counted, and the one of the same try.
    assert "retrying (attempt 2 of 2)" in caplog.text and "in a try already counted as crashed" in caplog.text
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    reference = run_trial(TrialJob("lightgbm", 0, LGB, DATA, 2, seed=5),
                          FitSettings(FAST["tree_rounds"], FAST["tree_early_stopping_rounds"], threads=1))
    assert [r.score for r in results] == [r.score for r in reference]


def test_a_worker_that_aborts_once_is_replaced_and_the_retry_gives_the_same_result(tmp_path, inject):
    marker = tmp_path / "aborted-once"
    with _executor(tmp_path, retries=1) as ex:
        results = ex.run_batch([inject(_job(0), f"abort_once:{marker}"), _job(1)])
    assert marker.exists()  # it did abort
    assert all(r.status == "ok" for r in results)
    reference = run_trial(_job(0), FitSettings(FAST["tree_rounds"], FAST["tree_early_stopping_rounds"], threads=1))
    assert [r.score for r in results[:3]] == [r.score for r in reference]


def test_a_catboost_gpu_trial_that_outgrows_the_auto_reserve_is_retried_with_catboosts_default(tmp_path, inject):
    """CatBoost aborts its process when a GPU fit outgrows its memory reserve. Under "auto" the pool
    retries that trial once with CatBoost's default reserve (not counted against trial_retries), and
    later CatBoost trials on that data get it at once. There is no GPU here: the retried trial then
    fails fast for want of CUDA, with CatBoost's own error instead of the crash."""
    pytest.importorskip("catboost")
    oom, later = (inject(_job(t, model_type="catboost", params={"depth": 4}), "catboost_gpu_oom") for t in (0, 2))
    with _executor(tmp_path, devices=[0], retries=0, tree_device="gpu") as ex:
        first = ex.run_batch([oom, _job(1)])
        assert ex.pool.restarts == 1 and ex.pool.catboost_full_reserve == {DATA.key}
        second = ex.run_batch([later])
        assert ex.pool.restarts == 1  # no second crash
    for r in first[:3] + second:  # ok where there is a GPU
        assert r.status == "ok" or ("SIGABRT" not in r.error and "CatBoostError" in r.error), r.error
    assert all(r.status == "ok" for r in first[3:])


def test_two_catboost_trials_that_outgrow_the_auto_reserve_at_once_both_get_the_free_retry(tmp_path, inject):
    """On two GPUs both trials are sent with the auto reserve before either dies: the second death must
    not count as an ordinary crash because the first one already switched the data to 0.95."""
    pytest.importorskip("catboost")
    jobs = [inject(_job(t, model_type="catboost", params={"depth": 4}), "catboost_gpu_oom") for t in (0, 1)]
    with _executor(tmp_path, devices=[0, 1], retries=0, tree_device="gpu") as ex:
        results = ex.run_batch(jobs)
        assert ex.pool.restarts == 2
    for r in results:
        assert r.status == "ok" or ("SIGABRT" not in r.error and "CatBoostError" in r.error), r.error


def test_an_earlier_trials_out_of_memory_line_does_not_make_a_later_crash_a_free_retry(tmp_path, inject):
    pytest.importorskip("catboost")
    said_oom = inject(_job(0, model_type="catboost", params={"depth": 4}), "stderr:Error: Out of memory. Requested 13 MB")
    aborts = inject(_job(1, model_type="catboost", params={"depth": 4}), "abort")
    with _executor(tmp_path, devices=[0], retries=0, tree_device="gpu", tree_parallel_workers=1) as ex:
        ex.run_batch([said_oom])
        assert ex.pool.restarts == 0  # that worker lives on, its stderr tail holding the line
        crashed = ex.run_batch([aborts])
        assert ex.pool.catboost_full_reserve == set()
    assert all(r.status == "fail" and "gave up after 1 attempt(s)" in r.error for r in crashed)


def test_an_explicit_catboost_reserve_that_is_outgrown_fails_like_any_crash(tmp_path, inject):
    pytest.importorskip("catboost")
    oom = inject(_job(0, model_type="catboost", params={"depth": 4}), "catboost_gpu_oom")
    with _executor(tmp_path, devices=[0], retries=0, tree_device="gpu", catboost_gpu_ram_part=0.3) as ex:
        results = ex.run_batch([oom])
        assert ex.pool.catboost_full_reserve == set()
    assert all(r.status == "fail" and "SIGABRT" in r.error and "gave up after 1 attempt(s)" in r.error
               for r in results)
    assert "TOutOfMemoryError" in results[0].error  # the worker's last stderr line


def test_a_worker_killed_mid_trial_fails_that_trial_and_the_others_finish(tmp_path, inject):
    sleeper = inject(_job(0), "sleep:120")
    with _executor(tmp_path, retries=0) as ex:
        killed = []

        def kill_the_sleeper():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed:
                for pid, _, trial in ex.pool.busy_workers():
                    if trial == 0:  # one of the workers training its folds
                        time.sleep(0.3)  # well inside the trial
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
                time.sleep(0.05)

        ex.pool.start()
        killer = threading.Thread(target=kill_the_sleeper)
        killer.start()
        started = time.monotonic()
        results = ex.run_batch([sleeper, _job(1), _job(2)])
        killer.join()
        assert time.monotonic() - started < 60  # no wait for the 120 s trial
        assert killed and killed[0] not in ex.pool.worker_pids()
        # The rebuilt pool serves the next batch.
        assert [r.status for r in ex.run_batch([_job(3)])] == ["ok"] * 3
    assert [r.status for r in results[:3]] == ["fail"] * 3
    assert all("SIGKILL" in r.error and "lightgbm trial 0" in r.error for r in results[:3])
    assert all(r.status == "ok" for r in results[3:])


def test_a_worker_that_dies_while_a_child_it_forked_holds_its_pipes_is_still_seen_dead(tmp_path, inject):
    # The pool learns of a death from the end of the worker's stdout; a forked child that outlives the
    # worker keeps that pipe open. The pool must notice the exit itself rather than wait for the child.
    gate = tmp_path / "children-may-exit"
    started = time.monotonic()
    try:
        with _executor(tmp_path, retries=0) as ex:
            results = ex.run_batch([inject(_job(0), f"orphan_pipes:{gate}"), _job(1)])
            assert ex.pool.restarts >= 1
            assert [r.status for r in ex.run_batch([_job(2)])] == ["ok"] * 3  # the replacements serve
        assert time.monotonic() - started < 60  # the children hold the pipes for up to 120 s
    finally:
        gate.touch()
    assert [r.status for r in results[:3]] == ["fail"] * 3
    assert all("SIGABRT" in r.error and "lightgbm trial 0" in r.error for r in results[:3])
    assert all(r.status == "ok" for r in results[3:])


def test_a_worker_whose_end_of_stream_waits_in_the_queue_is_not_taken_for_silently_dead(tmp_path, monkeypatch):
    # A GPU worker whose fit failed retires: fold results, "done", exit. With a slow result callback
    # the pool sees the exit long before it reaches those queued lines; they must still count.
    pytest.importorskip("xgboost")
    monkeypatch.setattr(slots_module, "SILENT_DEATH_S", 0.5)
    job = _job(0, model_type="xgboost", params={"max_depth": 3})  # no GPU here: each GPU fit fails
    with _executor(tmp_path, devices=[0], retries=0, tree_device="gpu", tree_parallel_workers=1) as ex:
        results = ex.run_batch([job], on_result=lambda result: time.sleep(1.5))
        assert ex.pool.restarts == 0  # its exit was a retirement, not a crash
    assert all(r.status == "fail" and "gave up" not in r.error for r in results), [r.error for r in results]


def test_a_worker_that_died_idle_between_batches_costs_no_trial_a_retry(tmp_path):
    # The OOM killer (each tree worker holds a copy of the data) or an operator takes an idle worker: the
    # next batch must not hand it a trial and charge that trial with its death.
    with _executor(tmp_path, retries=0) as ex:
        ex.run_batch([_job(0), _job(1)])
        idle = ex.pool.worker_pids()[0]
        os.kill(idle, signal.SIGKILL)
        while idle in ex.pool.worker_pids():
            time.sleep(0.05)
        results = ex.run_batch([_job(2), _job(3)])
        assert idle not in ex.pool.worker_pids() and ex.pool.restarts == 1
    assert [r.status for r in results] == ["ok"] * 6, [r.error for r in results]


def test_bytes_on_stderr_that_are_not_utf8_do_not_stall_the_worker(tmp_path, inject):
    # Caf\xe9 as Latin-1, then more than a pipe holds (64 KiB): were the thread that drains stderr to die
    # on the byte, the worker would block on its next write and the trial would hang until its timeout.
    # (100 kB: Linux allows one environment variable at most 128 KiB.)
    noisy = inject(_job(0), "stderr_latin1:caf\u00e9 " + "x" * 100_000)
    with _executor(tmp_path, retries=0, tree_parallel_workers=1, tree_trial_timeout_s=120) as ex:
        results = ex.run_batch([noisy])
        tail = list(ex.pool.slots.workers[0].stderr_tail)
    assert [r.status for r in results] == ["ok"] * 3, [r.error for r in results]
    assert any(line.startswith("caf\\xe9 xxx") for line in tail), tail[:3]


def test_a_trial_that_hangs_is_killed_after_the_timeout_retried_then_failed(tmp_path, inject):
    started = time.monotonic()
    with _executor(tmp_path, retries=1, tree_trial_timeout_s=3) as ex:
        results = ex.run_batch([inject(_job(0), "sleep:120"), _job(1), _job(2)])
        assert len(ex.pool.worker_pids()) == 2  # the killed worker was replaced
    assert time.monotonic() - started < 60  # no wait for the 120 s trial
    assert [r.status for r in results[:3]] == ["fail"] * 3
    assert all("ran past tree_trial_timeout_s=3" in r.error and "gave up after 2 attempt(s)" in r.error
               for r in results[:3])
    assert all(r.status == "ok" for r in results[3:])


def test_a_trial_that_raises_fails_with_the_error_text_and_the_others_are_unaffected(tmp_path):
    jobs = [_job(0), _job(1, params={"num_leaves": -3}), _job(2)]
    with _executor(tmp_path) as ex:
        results = ex.run_batch(jobs)
        pids = ex.pool.worker_pids()
        assert ex.pool.restarts == 0 and len(pids) == 2  # a raising trial never costs a worker
    bad = results[3:6]
    assert [r.status for r in bad] == ["fail"] * 3
    assert all(r.score is None and "num_leaves" in r.error for r in bad)
    assert all(r.status == "ok" for r in results[:3] + results[6:])


def test_a_gpu_lease_not_had_in_time_fails_the_trial_naming_the_holder(tmp_path):
    jobs = [_job(0, model_type="catboost", params={"depth": 4}), _job(1)]
    with GpuLease(0, timeout=1, purpose="a test holding GPU 0"):
        with _executor(tmp_path, devices=[0], lease_timeout_s=1.0, tree_device="gpu") as ex:
            started = time.monotonic()
            results = ex.run_batch(jobs)
            assert time.monotonic() - started < 30  # no hang
    gpu_trial, cpu_trial = results[:3], results[3:]
    assert [r.status for r in gpu_trial] == ["fail"] * 3
    assert all(f"held by pid {os.getpid()}" in r.error and "a test holding GPU 0" in r.error for r in gpu_trial)
    assert all(r.status == "ok" for r in cpu_trial)


def test_after_a_lease_timeout_the_gpu_is_out_for_the_batch_and_its_queued_trials_fail_without_waiting(tmp_path):
    """Four GPU trials and GPU 0 held elsewhere: the first waits lease_timeout_s and fails naming the
    holder; the three queued behind it fail with the same reason at once (never sent to a worker:
    attempts 0), rather than each waiting its own lease_timeout_s. LightGBM is unaffected."""
    jobs = [_job(t, model_type="catboost", params={"depth": 4}) for t in range(4)] + [_job(4)]
    with GpuLease(0, timeout=1, purpose="a test holding GPU 0"):
        with _executor(tmp_path, devices=[0], lease_timeout_s=1.0, tree_device="gpu") as ex:
            results = ex.run_batch(jobs)
    gpu_trials = [results[3 * t:3 * t + 3] for t in range(4)]
    assert all(r.status == "fail" and "a test holding GPU 0" in r.error for trial in gpu_trials for r in trial)
    attempts = sorted(trial[0].info["attempts"] for trial in gpu_trials)
    assert attempts == [0, 0, 0, 1]
    assert all(r.status == "ok" for r in results[12:])


def test_a_fault_is_injected_into_its_own_trial_alone(tmp_path, inject):
    # Trial 1 of another model type, and no trial 0: faults are chosen by model type and trial number.
    inject(_job(1, model_type="xgboost", params={"max_depth": 3}), "abort")
    inject(_job(0, model_type="catboost", params={"depth": 4}), "abort")
    with _executor(tmp_path) as ex:
        results = ex.run_batch([_job(1)])
        assert ex.pool.restarts == 0
    assert all(r.status == "ok" for r in results)


PARENT_THAT_STARTS_A_BUSY_WORKER = """
import json, subprocess, sys
config = {"placement": {"slot": 0, "gpu": None, "cores": []}, "rounds": 30, "early_stopping_rounds": 10}
worker = subprocess.Popen([sys.executable, "-m", "watcher_plugins.tree_parallel.worker", "--config",
                           json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert json.loads(worker.stdout.readline())["event"] == "ready"
worker.stdin.write(json.dumps({"command": "train", "job": json.loads(sys.argv[1]), "folds": [0]}) + "\\n")
worker.stdin.flush()
print(worker.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_worker_whose_pool_process_dies_mid_trial_exits_instead_of_training_on(tmp_path, inject):
    """The pool holds the GPU lease for its workers, and the OS frees it when the pool's process dies:
    a worker in the middle of a (here 120 s) trial must not go on using the GPU after that."""
    import json
    import subprocess
    import sys

    job = inject(_job(0), "sleep:120")  # the parent, then its worker, inherit the faults
    parent = subprocess.Popen([sys.executable, "-c", PARENT_THAT_STARTS_A_BUSY_WORKER, json.dumps(job.to_json())],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30  # a hang guard: the worker's watchdog polls its parent every second
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.1)
    assert not _alive(worker_pid), "the orphaned worker went on with its trial"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


def test_a_reply_the_protocol_does_not_allow_kills_the_worker_and_fails_its_trial_naming_the_field(tmp_path, inject):
    # The worker sends a fold reply whose fold_idx is no integer: the pool cannot use it, and a worker
    # whose protocol stream is corrupt is replaced. retries=0: the trial fails with what was wrong.
    with _executor(tmp_path, retries=0, tree_parallel_workers=1) as ex:
        results = ex.run_batch([inject(_job(0), "bad_reply"), _job(1)])
        assert ex.pool.restarts == 1
    assert [r.status for r in results[:3]] == ["fail"] * 3
    assert all("was killed: it wrote a line that its protocol does not allow: $.result.fold_idx: 'first' is not "
               "of type 'integer'" in r.error and "gave up after 1 attempt(s)" in r.error for r in results[:3])
    assert all(r.status == "ok" for r in results[3:])


def test_a_trial_whose_request_the_worker_refuses_fails_at_once_with_the_reason(tmp_path):
    # A seed the protocol refuses: the worker answers with an error line naming the field, and trains
    # nothing; the pool fails the trial with it instead of waiting for results until the trial timeout.
    refused = TrialJob("lightgbm", 0, LGB, DATA, 3, seed=-1)
    started = time.monotonic()
    with _executor(tmp_path, retries=0, tree_trial_timeout_s=600) as ex:
        results = ex.run_batch([refused, _job(1)])
        assert ex.pool.restarts == 0  # a refusal costs no worker
    assert time.monotonic() - started < 60
    assert [r.status for r in results[:3]] == ["fail"] * 3
    assert all("refused the trial's request: invalid_request: not a request the protocol allows: $.job.seed: -1 is "
               "less than the minimum of 0" in r.error for r in results[:3]), results[0].error
    assert all(r.status == "ok" for r in results[3:])
