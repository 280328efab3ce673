"""File-locked GPU leases: one lock file per GPU, held by whatever uses that GPU.

The lock file is never deleted (deleting a lock file others wait on breaks mutual exclusion); the OS
frees the lock when its holder dies. Beside each lock, a small JSON file names the current holder
(pid, host, since, purpose) so that a waiter that times out can say who holds the GPU.

A lease is exclusive between processes (and between GpuLease objects of one process): the holder may
be a process that trains on the GPU itself (an NN worker, the tree trial CLI) or one that holds it on
behalf of workers it alone sends GPU work to (a tree pool, whose workers share the GPU; see
tree_parallel/pool.py). ``try_acquire`` never waits, for a holder that polls while doing other work.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import filelock

from watcher_plugins.errors import LeaseError, LeaseTimeout

# Newer filelock releases unlink a Unix lock file on release unless told to keep it; we must keep it
# (a process waiting on the old inode would otherwise lock a file nobody else sees).
_KEEP_LOCK_FILE = (
    {"preserve_lock_file": True} if "preserve_lock_file" in inspect.signature(filelock.FileLock).parameters else {}
)
LEASE_DIR_ENV = "WATCHER_LEASE_DIR"


def default_lease_dir() -> Path:
    """$WATCHER_LEASE_DIR, else a directory in the system temp dir shared by every user of the host."""
    return Path(os.environ.get(LEASE_DIR_ENV) or Path(tempfile.gettempdir()) / "watcher_plugins-gpu-leases")


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
        try:
            self.lease_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LeaseError(f"cannot create the lease directory {self.lease_dir}: {exc}") from None
        # thread_local=False: a lease belongs to the process, whichever thread releases it.
        lock = filelock.FileLock(str(self.lock_path), mode=0o666, thread_local=False, **_KEEP_LOCK_FILE)
        try:
            lock.acquire(timeout=timeout)  # 0: one attempt
        except filelock.Timeout:
            return False
        self._lock = lock
        record = LeaseHolder(pid=os.getpid(), host=socket.gethostname(), since=time.time(), purpose=self.purpose)
        tmp = self.holder_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(record)), encoding="utf-8")
        os.replace(tmp, self.holder_path)
        return True

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
