"""The worker process over its real pipes: bad input gets an error line with a code and the worker
keeps serving; end of input is a clean exit with the lease freed; library output never reaches the
protocol; injected OOM and CUDA errors end as the protocol says. Every reply matches the schema."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from watcher_plugins.errors import LeaseTimeout
from watcher_plugins.faults import ENV, encode
from watcher_plugins.lease import GpuLease
from watcher_plugins.nn_batch.protocol import MAX_LINE_BYTES, PROGRESS_INTERVAL_S, FitJob
from watcher_plugins.records import STATUS_OK, STATUS_OOM, DataRef

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schemas" / "worker_protocol.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
DATA = DataRef(embedded="survivors", rows=400)
TERMINAL = {"pong", "bye", "batch_done", "error", "fatal"}
READ_TIMEOUT_S = 120


class WorkerUnderTest:
    """The worker started as the executor starts it, talked to line by line."""

    def __init__(self, tmp_path: Path, faults: dict | None = None, args: tuple[str, ...] = ("--device", "cpu"),
                 visible: str = "", env: dict | None = None):
        env = {k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": visible,
                                 **(env or {})}.items() if v is not None}  # None: left out
        if faults:
            env[ENV] = encode(**faults)
        self.stderr_path = tmp_path / "worker.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "watcher_plugins.nn_batch.worker", *args],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout] + [self.lines.put(b"")],
                         daemon=True).start()

    def send_raw(self, raw: bytes) -> None:
        self.process.stdin.write(raw)
        self.process.stdin.flush()

    def read(self) -> dict:
        line = self.lines.get(timeout=READ_TIMEOUT_S)  # a hung worker fails the test instead of hanging it
        assert line, f"worker closed stdout; stderr: {self.stderr_path.read_text()[-2000:]}"
        reply = json.loads(line)  # every stdout line is JSON ...
        VALIDATOR.validate(reply)  # ... and a reply the schema allows
        return reply

    def request(self, obj: dict, until: set[str] = TERMINAL) -> list[dict]:
        VALIDATOR.validate(obj)
        self.send_raw(json.dumps(obj).encode() + b"\n")
        lines = [self.read()]
        while lines[-1]["event"] not in until:
            lines.append(self.read())
        return lines

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


@pytest.fixture
def worker_factory(tmp_path):
    started = []

    def start(faults=None, args=("--device", "cpu"), visible=""):
        worker = WorkerUnderTest(tmp_path, faults, args, visible)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def job(trial: int, fold: int = 0, hidden=(16, 8), **params) -> dict:
    fit = FitJob(trial, fold, 2, 5, tuple(hidden), params.get("lr", 1e-2), params.get("weight_decay", 0.0),
                 params.get("dropout", 0.0), DATA)
    return fit.to_json()


def test_bad_input_gets_an_error_line_with_a_code_and_the_worker_keeps_serving(worker_factory):
    worker = worker_factory()
    bad_job = job(0)
    bad_job["params"]["hidden_layers"] = [16, "wide"]
    huge_lr = job(0)
    huge_lr["params"]["lr"] = 10**400  # valid JSON, but too big for a float
    cases = [
        (b"{not json\n", "malformed_json"),
        (b"\n", "malformed_json"),  # a blank line is no request either: a client waiting for its reply gets one
        (b"  \r\n", "malformed_json"),
        (b'{"command": "fly"}\n', "unknown_command"),
        (b'["ping"]\n', "invalid_request"),
        (json.dumps({"command": "train_batch", "jobs": [bad_job]}).encode() + b"\n", "invalid_job"),
        (json.dumps({"command": "train_batch", "jobs": [huge_lr]}).encode() + b"\n", "invalid_job"),
        (b'{"command": "ping", "x": "\xff\xfe"}\n', "invalid_utf8"),
        (b'{"command": "ping", "pad": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}\n', "line_too_long"),
        # JSON that Python's decoder gives up on with other errors than JSONDecodeError.
        (b"[" * 200_000 + b"\n", "malformed_json"),
        (b'{"command": "ping", "x": ' + b"9" * 5000 + b"}\n", "malformed_json"),
    ]
    for raw, code in cases:
        worker.send_raw(raw)
        reply = worker.read()
        assert reply["event"] == "error" and reply["code"] == code, (code, reply)
        assert worker.request({"command": "ping"})[0]["event"] == "pong"


def test_invalid_job_error_names_the_json_path(worker_factory):
    worker = worker_factory()
    bad = job(0)
    bad["params"]["lr"] = -1
    worker.send_raw(json.dumps({"command": "train_batch", "jobs": [job(1), bad]}).encode() + b"\n")
    reply = worker.read()
    assert reply["code"] == "invalid_job" and reply["message"].startswith("$.jobs[1].params.lr: expected a number > 0")


def test_train_batch_gives_one_line_per_job_then_a_closing_line(worker_factory):
    worker = worker_factory()
    jobs = [job(t, fold) for t in range(2) for fold in range(2)]
    lines = worker.request({"command": "train_batch", "jobs": jobs, "n_concurrent": 3, "max_epochs": 8})
    results, closing = [line for line in lines[:-1] if line["event"] != "progress"], lines[-1]
    assert sorted((r["trial_number"], r["fold_idx"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["status"] == STATUS_OK and isinstance(r["score"], float) for r in results)
    assert closing["event"] == "batch_done" and closing["jobs"] == 4 and closing["ok"] == 4
    assert closing["strategy"] == "fused" and closing["n_concurrent_used"] == 3
    single = worker.request({"command": "train", "job": jobs[0], "max_epochs": 8}, until={"result", "error"})
    assert len(single) == 1 and single[0]["event"] == "result"
    assert abs(single[0]["score"] - next(r["score"] for r in results if r["trial_number"] == 0 and r["fold_idx"] == 0)) < 1e-4
    pong = worker.request({"command": "ping"})[0]
    assert pong["datasets_cached"] == 1 and pong["tree_libraries_loaded"] == []
    assert worker.request({"command": "shutdown"})[0]["event"] == "bye"
    assert worker.process.wait(timeout=30) == 0


def test_a_long_batch_reports_its_progress_at_most_once_a_second(worker_factory):
    worker = worker_factory()
    jobs = [job(t, fold, hidden=(64, 64)) for t in range(2) for fold in range(2)]
    cap = 1500
    started = time.monotonic()
    lines = worker.request({"command": "train_batch", "jobs": jobs, "n_concurrent": 4, "max_epochs": cap,
                            "patience": cap})  # read() checked every line against the schema
    seconds = time.monotonic() - started
    progress = [line for line in lines if line["event"] == "progress"]
    assert lines[-1]["event"] == "batch_done" and lines[-1]["ok"] == 4
    assert seconds > 3 and len(progress) >= 2, (seconds, progress)
    assert len(progress) <= seconds / PROGRESS_INTERVAL_S + 1
    epochs = [line["model_epochs"] for line in progress]
    assert epochs == sorted(epochs) and epochs[0] > 0
    shares = [line["fraction_done"] for line in progress]
    assert shares == sorted(shares) and 0 < shares[0] and shares[-1] < 1, shares
    assert all(line["fits"] == 4 and line["fits_done"] == 0 for line in progress)


def test_closed_stdin_is_a_clean_exit_that_frees_the_lease(worker_factory, tmp_path):
    lease_dir = tmp_path / "leases"
    worker = worker_factory(args=("--device", "cpu", "--gpu", "0", "--lease-dir", str(lease_dir)))
    assert worker.request({"command": "ping"})[0]["gpu_lease"] == 0
    with pytest.raises(LeaseTimeout, match="nn_batch worker pid"):
        GpuLease(0, lease_dir, timeout=0.2).acquire()
    worker.process.stdin.close()
    assert worker.process.wait(timeout=30) == 0
    with GpuLease(0, lease_dir, timeout=5):
        pass


def test_library_output_never_reaches_the_protocol(worker_factory):
    worker = worker_factory({"nn_noise": True})
    lines = worker.request({"command": "train_batch", "jobs": [job(0), job(1)], "max_epochs": 3})
    assert lines[-1]["event"] == "batch_done"  # read() checked every stdout line against the schema
    worker.request({"command": "shutdown"})
    worker.process.wait(timeout=30)
    stderr = worker.stderr_path.read_text()
    assert "noise from a library's print()" in stderr and "noise written to file descriptor 1" in stderr


def test_worker_reports_oom_and_keeps_serving(worker_factory):
    worker = worker_factory({"nn_oom_at_concurrency": 1})
    lines = worker.request({"command": "train_batch", "jobs": [job(0), job(1)], "n_concurrent": 2, "max_epochs": 5})
    assert [line["status"] for line in lines[:-1]] == [STATUS_OOM, STATUS_OOM]
    assert all(line["score"] is None and "out of memory" in line["error"] for line in lines[:-1])
    assert lines[-1]["oom"] == 2 and lines[-1]["oom_retries"] == 1 and lines[-1]["n_concurrent_used"] == 1
    assert worker.request({"command": "ping"})[0]["event"] == "pong"


def test_cuda_error_ends_the_worker_with_a_fatal_line(worker_factory):
    worker = worker_factory({"nn_cuda_error_on_trial": 0})
    lines = worker.request({"command": "train_batch", "jobs": [job(0)]})
    assert lines[-1]["event"] == "fatal" and lines[-1]["code"] == "cuda_error"
    assert worker.process.wait(timeout=30) == 3


def test_a_worker_started_without_gpu_holds_the_lease_of_the_gpu_it_would_train_on(worker_factory, tmp_path):
    # CUDA_VISIBLE_DEVICES lists two GPUs: CUDA's device 0 is the first, 3, so that is the lease to hold
    # (no GPU here, so it trains on the CPU, still holding it).
    lease_dir = tmp_path / "leases"
    worker = worker_factory(args=("--device", "auto", "--lease-dir", str(lease_dir)), visible="3,5")
    assert worker.request({"command": "ping"})[0]["gpu_lease"] == 3
    with pytest.raises(LeaseTimeout, match="nn_batch worker pid"):
        GpuLease(3, lease_dir, timeout=0.2).acquire()


def test_a_worker_given_a_gpu_sees_that_gpu_alone(worker_factory, tmp_path):
    # --gpu 1 under a CUDA_VISIBLE_DEVICES=0,1 set by hand: CUDA's device 0 would be GPU 0, so the
    # worker would train there holding GPU 1's lease. It narrows the list to the GPU it holds.
    lease_dir = tmp_path / "leases"
    worker = worker_factory(args=("--device", "auto", "--gpu", "1", "--lease-dir", str(lease_dir)), visible="0,1")
    pong = worker.request({"command": "ping"})[0]
    assert (pong["gpu_lease"], pong["cuda_visible_devices"]) == (1, "1")


def test_lease_held_elsewhere_is_a_fatal_line_naming_the_holder(worker_factory, tmp_path):
    lease_dir = tmp_path / "leases"
    with GpuLease(0, lease_dir, timeout=5, purpose="another run"):
        worker = worker_factory(args=("--device", "cpu", "--gpu", "0", "--lease-dir", str(lease_dir),
                                      "--lease-timeout", "0.3"))
        reply = worker.read()
    assert reply["event"] == "fatal" and reply["code"] == "lease_unavailable" and "another run" in reply["message"]
    assert worker.process.wait(timeout=30) == 4


def test_the_worker_sizes_torchs_threads_to_the_cpu_quota(tmp_path):
    # LOKY_MAX_CPU_COUNT stands in for a container's CPU quota (joblib reads both); torch alone would
    # size its pool by the cores it sees.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to tell the quota from the machine")
    unset = {"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None}  # tox sets them to 1
    worker = WorkerUnderTest(tmp_path, env={"LOKY_MAX_CPU_COUNT": "1", **unset})
    try:
        assert worker.request({"command": "ping"})[0]["threads"] == 1
    finally:
        worker.close()
    worker = WorkerUnderTest(tmp_path, env=unset)  # no quota: every core it may run on
    try:
        assert worker.request({"command": "ping"})[0]["threads"] == len(os.sched_getaffinity(0))
    finally:
        worker.close()
    worker = WorkerUnderTest(tmp_path, env={**unset, "OMP_NUM_THREADS": "1"})  # the user's own setting stands
    try:
        assert worker.request({"command": "ping"})[0]["threads"] == 1
    finally:
        worker.close()


# A host that starts a worker, sends it a batch that would train for hours and reports the worker's pid.
_HOST = """
import json, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-m", "watcher_plugins.nn_batch.worker", *sys.argv[2:]],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
def send(obj):
    worker.stdin.write(json.dumps(obj).encode() + b"\\n")
    worker.stdin.flush()
send({"command": "ping"})
assert json.loads(worker.stdout.readline())["event"] == "pong"
send(json.loads(sys.argv[1]))
time.sleep(1)  # training
print(worker.pid, flush=True)
time.sleep(3600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


def test_a_worker_whose_host_dies_mid_batch_ends_and_frees_its_lease(tmp_path):
    lease_dir = tmp_path / "leases"
    batch = {"command": "train_batch", "jobs": [job(0, hidden=(64, 32))], "n_concurrent": 1,
             "max_epochs": 10**6, "patience": 10**6}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    host = subprocess.Popen([sys.executable, "-c", _HOST, json.dumps(batch), "--device", "cpu", "--gpu", "0",
                             "--lease-dir", str(lease_dir)], stdout=subprocess.PIPE, env=env)
    line = host.stdout.readline()
    assert line, "the host could not start its worker"
    worker_pid = int(line)
    try:
        assert _running(worker_pid)
        host.kill()  # as the OOM killer would: the host has no chance to stop its worker
        host.wait()
        deadline = time.monotonic() + 30  # the worker sees its new parent within a second
        while _running(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker_pid), "the orphaned worker trains on"
        with GpuLease(0, lease_dir, timeout=5):
            pass
    finally:
        host.stdout.close()
        if _running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
