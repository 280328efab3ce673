"""File-locked GPU leases: one lock file per GPU, held by whatever uses that GPU.

The lock file is never deleted (deleting a lock file others wait on breaks mutual exclusion); the OS
frees the lock when its holder dies. Beside each lock, a small JSON file names the current holder
(pid, host, since, purpose) so that a waiter that times out can say who holds the GPU.

A lease is exclusive between processes (and between GpuLease objects of one process): the holder may
be a process that trains on the GPU itself (an NN worker, the tree trial CLI) or one that holds it on
behalf of workers it alone sends GPU work to (a tree pool, whose workers share the GPU; see
tree_parallel/leases.py). ``try_acquire`` never waits, for a holder that polls while doing other work.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock

from watcher_plugins.errors import LeaseError, LeaseTimeout

# Newer filelock releases unlink a Unix lock file on release unless told to keep it; we must keep it
# (a process waiting on the old inode would otherwise lock a file nobody else sees).
_KEEP_LOCK_FILE: dict[str, Any] = (
    {"preserve_lock_file": True} if "preserve_lock_file" in inspect.signature(filelock.FileLock).parameters else {}
)
LEASE_DIR_ENV = "WATCHER_LEASE_DIR"


def shared_lease_dir() -> Path:
    """The directory in the system temp dir shared by every user of the host."""
    return Path(tempfile.gettempdir()) / "watcher_plugins-gpu-leases"


def default_lease_dir() -> Path:
    """$WATCHER_LEASE_DIR, else the shared directory in the system temp dir."""
    return Path(os.environ.get(LEASE_DIR_ENV) or shared_lease_dir())


@dataclass(frozen=True)
class LeaseHolder:
    pid: int
    host: str
    since: float
    purpose: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} ({self.purpose}) since {started}"


class GpuLease:
    """Exclusive use of one GPU across processes. Use as a context manager.

    >>> with GpuLease(0, lease_dir, timeout=60, purpose="nn_batch worker"):
    ...     train_on_gpu_0()
    """

    def __init__(self, gpu: int, lease_dir: str | Path | None = None, timeout: float = 600.0, purpose: str = ""):
        self.gpu = int(gpu)
        self.lease_dir = Path(lease_dir) if lease_dir else default_lease_dir()
        self._shared = self.lease_dir == shared_lease_dir()  # made shared; a directory of the user's keeps its mode
        self.timeout = float(timeout)
        self.purpose = purpose or f"pid {os.getpid()}"
        self.lock_path = self.lease_dir / f"gpu-{self.gpu}.lock"
        self.holder_path = self.lease_dir / f"gpu-{self.gpu}.holder.json"
        self._lock: filelock.BaseFileLock | None = None

    def holder(self) -> LeaseHolder | None:
        """Who last took this lease (only meaningful while the lock is held by someone)."""
        try:
            return LeaseHolder(**json.loads(self.holder_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self) -> GpuLease:
        """Take the lease, waiting up to ``timeout`` seconds; LeaseTimeout names the holder."""
        if not self._take(self.timeout):
            raise self.timeout_error()
        return self

    def try_acquire(self) -> bool:
        """Take the lease if it is free now (or already held through this object); never waits."""
        return self.is_held or self._take(0)

    def timeout_error(self) -> LeaseTimeout:
        """What a waiter that gave up after ``timeout`` seconds says: who holds the lease, and since when."""
        holder = self.holder()
        who = holder.describe() if holder else "an unknown process (no holder record)"
        return LeaseTimeout(
            f"GPU {self.gpu} lease not had within {self.timeout:g}s: held by {who}; lock file {self.lock_path}"
        )

    def _take(self, timeout: float) -> bool:
        what = "cannot create the lease directory"  # wording the tree pool tests match
        try:
            self._make_dir()
            what = "cannot use the lease directory"
            # thread_local=False: a lease belongs to the process, whichever thread releases it. mode=0o666
            # (filelock chmods past the umask): other users of a shared directory must open the same file.
            lock = filelock.FileLock(str(self.lock_path), mode=0o666, thread_local=False, **_KEEP_LOCK_FILE)
            try:
                lock.acquire(timeout=timeout)  # 0: one attempt
            except filelock.Timeout:
                return False
            try:
                self._write_holder()
            except BaseException:
                lock.release(force=True)  # else nobody could have the GPU until this process exits
                raise
        except OSError as exc:
            raise LeaseError(
                f"GPU {self.gpu} lease: {what} {self.lease_dir}: {exc}; "
                f"set ${LEASE_DIR_ENV} (or lease_dir) to a directory you can write"
            ) from exc
        self._lock = lock
        return True

    def _make_dir(self) -> None:
        self.lease_dir.mkdir(parents=True, exist_ok=True)
        st = os.lstat(self.lease_dir)
        # The shared default is for every user of the host, like /tmp: 1777 (mkdir's mode is cut by the
        # umask). Only its owner may chmod it; lstat, so a planted symlink is never followed to chmod its target.
        if self._shared and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o1777:
            os.chmod(self.lease_dir, 0o1777)

    def _write_holder(self) -> None:
        record = LeaseHolder(pid=os.getpid(), host=socket.gethostname(), since=time.time(), purpose=self.purpose)
        # Rewritten in place, not replaced: in a sticky directory only a file's owner may replace it, and
        # the last holder may be another user. No O_CREAT on an existing file (fs.protected_regular refuses
        # it on another user's file in a sticky directory); anyone may plant links or FIFOs here, hence
        # O_NOFOLLOW and O_NONBLOCK (a FIFO fails instead of hanging).
        flags = os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        created = False
        try:
            fd = os.open(self.holder_path, flags | os.O_TRUNC)
        except FileNotFoundError:
            fd, created = os.open(self.holder_path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if created:
                os.fchmod(fd, 0o666)  # past the umask: the next holder may be another user
            f.write(json.dumps(asdict(record)))

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None

    @property
    def is_held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def __enter__(self) -> GpuLease:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
