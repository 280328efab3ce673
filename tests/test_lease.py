"""GPU leases: exclusive across processes, freed when the holder dies, and a timeout names the holder."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from watcher_plugins.errors import LeaseTimeout
from watcher_plugins.lease import GpuLease

HOLD = """
import sys, time
from watcher_plugins.lease import GpuLease
lease = GpuLease(0, sys.argv[1], timeout=5, purpose="test holder").acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_lease_held_by_another_process_times_out_naming_the_holder(tmp_path, holder_process):
    started = time.monotonic()
    with pytest.raises(LeaseTimeout) as excinfo:
        GpuLease(0, tmp_path, timeout=0.3).acquire()
    assert time.monotonic() - started < 5  # no hang
    message = str(excinfo.value)
    assert f"pid {holder_process.pid}" in message and "(test holder)" in message
    assert "GPU 0 lease not had within 0.3s" in message


def test_other_gpus_are_free_while_one_is_held(tmp_path, holder_process):
    with GpuLease(1, tmp_path, timeout=0.3) as lease:
        assert lease.is_held


def test_the_os_frees_the_lease_when_its_holder_dies(tmp_path, holder_process):
    holder_process.kill()
    holder_process.wait()
    with GpuLease(0, tmp_path, timeout=2) as lease:
        assert lease.is_held
        assert lease.holder().pid != holder_process.pid


def test_release_keeps_the_lock_file_and_allows_reacquire(tmp_path):
    lease = GpuLease(3, tmp_path, timeout=1, purpose="me")
    with lease:
        assert lease.holder().purpose == "me"
    assert not lease.is_held
    assert (tmp_path / "gpu-3.lock").exists()  # never deleted: waiters may hold its inode
    with GpuLease(3, tmp_path, timeout=1):
        pass


def test_try_acquire_never_waits_and_takes_a_free_lease(tmp_path, holder_process):
    started = time.monotonic()
    assert GpuLease(0, tmp_path, timeout=30).try_acquire() is False  # held elsewhere: no 30 s wait
    assert time.monotonic() - started < 5
    lease = GpuLease(1, tmp_path, timeout=30, purpose="poller")
    assert lease.try_acquire() and lease.try_acquire()  # free, then already ours
    assert lease.is_held and lease.holder().purpose == "poller"
    lease.release()
    assert not lease.is_held


def test_timeout_error_names_the_holder(tmp_path, holder_process):
    lease = GpuLease(0, tmp_path, timeout=7)
    assert not lease.try_acquire()
    message = str(lease.timeout_error())
    assert message.startswith("GPU 0 lease not had within 7s: held by ")
    assert f"pid {holder_process.pid}" in message and "(test holder)" in message


def test_two_leases_of_one_process_exclude_each_other(tmp_path):
    # Two tree pools of one host process each hold their GPUs' leases through their own GpuLease.
    with GpuLease(0, tmp_path, timeout=1, purpose="first pool"):
        second = GpuLease(0, tmp_path, timeout=0.2)
        assert not second.try_acquire()
        with pytest.raises(LeaseTimeout, match="first pool"):
            second.acquire()
    assert second.try_acquire()
    second.release()
