"""GPU leases: exclusive across processes, freed when the holder dies, and a timeout names the holder."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from watcher_plugins.errors import LeaseError, LeaseTimeout
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


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("premade", [False, True], ids=["new", "made-0755-before"])
def test_the_default_lease_dir_is_shared_by_every_user(tmp_path, monkeypatch, umask_022, premade):
    monkeypatch.delenv("WATCHER_LEASE_DIR")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / "watcher_plugins-gpu-leases"
    if premade:
        shared.mkdir(mode=0o755)
    with GpuLease(0, timeout=1) as lease:
        assert lease.lease_dir == shared
    assert _mode(shared) == 0o1777  # sticky and world-writable, like /tmp
    assert _mode(shared / "gpu-0.lock") == 0o666
    assert _mode(shared / "gpu-0.holder.json") == 0o666


@pytest.fixture
def open_temp():
    """A temp dir other users can enter (pytest's tmp_path lies in a directory private to its user)."""
    path = tempfile.mkdtemp()
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as a second user")
def test_a_second_user_takes_a_lease_in_the_shared_dir(open_temp, monkeypatch, umask_022):
    monkeypatch.delenv("WATCHER_LEASE_DIR")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: open_temp)
    with GpuLease(0, timeout=1, purpose="first user"):  # makes the directory and gpu-0's files
        pass
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and must never return into pytest
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with GpuLease(0, timeout=1, purpose="second user") as lease:
                code = 0 if lease.holder().purpose == "second user" else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    with GpuLease(0, timeout=1) as lease:  # and the first user can take it back
        assert lease.holder().pid == os.getpid()


def test_a_named_lease_dir_keeps_its_mode(tmp_path, monkeypatch, umask_022):
    named = tmp_path / "mine"
    with GpuLease(0, named, timeout=1):
        pass
    monkeypatch.setenv("WATCHER_LEASE_DIR", str(tmp_path / "from-env"))
    with GpuLease(0, timeout=1):
        pass
    assert _mode(named) == _mode(tmp_path / "from-env") == 0o755


def test_a_failed_holder_record_write_releases_the_lock(tmp_path):
    (tmp_path / "gpu-0.holder.json").mkdir()  # the record cannot be written (whoever runs the test, root too)
    lease = GpuLease(0, tmp_path, timeout=1)
    with pytest.raises(LeaseError, match="gpu-0.holder.json") as excinfo:
        lease.acquire()
    assert not lease.is_held
    # excinfo keeps the failed attempt's frames (and its lock object) alive: freed only by a release, not by gc.
    (tmp_path / "gpu-0.holder.json").rmdir()
    other = GpuLease(0, tmp_path, timeout=0)
    assert other.try_acquire()  # the failed attempt left the lock free
    other.release()
    del excinfo


@pytest.mark.parametrize("blocker", ["leases", "leases/gpu-0.lock", "leases/gpu-0.holder.json"])
def test_os_errors_surface_as_lease_errors_naming_the_path_and_the_fix(tmp_path, blocker):
    # The wrong kind of file where the directory, the lock file or the holder record should be: fails as root too.
    (tmp_path / "leases").mkdir()
    if blocker == "leases":
        (tmp_path / "leases").rmdir()
        (tmp_path / "leases").write_text("")
    else:
        (tmp_path / blocker).mkdir()
    with pytest.raises(LeaseError) as excinfo:
        GpuLease(0, tmp_path / "leases", timeout=1).acquire()
    message = str(excinfo.value)
    assert str(tmp_path / blocker) in message
    assert "WATCHER_LEASE_DIR" in message and "lease_dir" in message
