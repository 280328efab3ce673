"""The GPU leases a tree pool holds on behalf of its workers.

The pool, not its workers, holds each GPU's lease (lease.py), on behalf of the workers it sends GPU
trials to. It takes the lease before it sends the first GPU trial to that GPU and releases it as soon
as no GPU trial is assigned there, at the end of every batch, and when it closes. So two pools, or a
pool and any other lease holder (an NN worker, the trial CLI), never use one GPU at once, while the
workers of one pool share it. A GPU trial whose lease is not free waits without blocking the pool
(which polls the lease), and fails, naming the holder, after ``lease_timeout_s``; that GPU then takes
no GPU trial for the rest of the batch (the others, or a failure with the same reason once every GPU is
out, take the queued ones).
If the host process dies, the OS frees its leases; its workers watch their parent pid and exit
within a second (orphans.exit_with_parent), so none goes on using a GPU it no longer has.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from watcher_plugins.errors import LeaseError
from watcher_plugins.lease import GpuLease

LEASE_POLL_S = 0.1  # how often a GPU trial waiting for its lease checks it again


class PoolLeases:
    """One GpuLease per GPU the pool has workers on, the trials waiting for them, and the GPUs out."""

    def __init__(self, gpus: Iterable[int], lease_dir: str | None, timeout_s: float):
        self.timeout_s = timeout_s
        self._leases = {gpu: GpuLease(gpu, lease_dir, timeout_s,
                                      purpose=f"tree_parallel pool: GPU trials of its workers on GPU {gpu}")
                        for gpu in sorted(set(gpus))}
        self._wait_since: dict[int, float] = {}  # GPU -> when its first waiting trial began to wait
        self.lost: dict[int, str] = {}  # GPU -> why its lease was not had: out for the rest of the batch
        self.stuck: set[int | None] = set()  # a worker there outlived SIGKILL: lease held until close()

    def held(self) -> list[int]:
        return [gpu for gpu, lease in self._leases.items() if lease.is_held]

    @property
    def all_lost(self) -> bool:
        return set(self.lost) >= set(self._leases)

    def now(self, gpu: int) -> bool:
        """Whether the pool holds ``gpu``'s lease, taking it if it is free; never waits."""
        lease = self._leases[gpu]
        if lease.is_held:
            return True
        if gpu not in self._wait_since:
            try:
                if lease.try_acquire():
                    return True
            except LeaseError:
                pass  # poll() meets it again and fails the waiting trials with it
        self._wait_since.setdefault(gpu, time.monotonic())
        return False

    def poll(self, waiting: Callable[[int], bool]) -> tuple[list[int], dict[int, str]]:
        """Try again the leases that trials wait for (``waiting(gpu)``): the GPUs whose lease the pool holds
        now, and those whose wait ended in failure, with the reason (out for the rest of the batch)."""
        granted, failed = [], {}
        for gpu, since in list(self._wait_since.items()):
            if waiting(gpu):
                try:
                    if self._leases[gpu].try_acquire():
                        granted.append(gpu)
                    elif time.monotonic() - since >= self.timeout_s:
                        failed[gpu] = str(self._leases[gpu].timeout_error())
                    else:
                        continue  # waits on
                except LeaseError as exc:  # the lease directory cannot be created, say
                    failed[gpu] = str(exc)
            del self._wait_since[gpu]
        self.lost.update(failed)
        return granted, failed

    def release_idle(self, busy: Callable[[int], bool]) -> None:
        """Release the leases of GPUs with no GPU trial assigned (``busy(gpu)`` false)."""
        for gpu, lease in self._leases.items():
            if lease.is_held and not busy(gpu) and gpu not in self.stuck:
                lease.release()

    def release(self, keep: Iterable[int | None] = ()) -> None:
        keep = set(keep)
        self._wait_since.clear()
        for gpu, lease in self._leases.items():
            if gpu not in keep:
                lease.release()

    def new_batch(self) -> None:
        self.lost = {}
