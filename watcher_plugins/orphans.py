"""Worker processes end with the process that started them, and how to check that none is left."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process within ``poll_s`` of its parent's death. The OS frees the dead host's GPU leases
    (and an NN worker's own at its exit): an orphan must not go on using a GPU that is no longer its own.
    A daemon thread watches the parent pid (PR_SET_PDEATHSIG would fire when the spawning *thread* ends,
    too early)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def processes_with_environment(text: str) -> list[int]:
    """Pids of the live processes (but this one) whose environment holds ``text`` (Linux /proc): a marker
    set in a host's environment finds the host and every worker it started, to check that none outlives
    it (tests, bench/interrupt_latency.py)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return [pid for pid in pids if pid != os.getpid()]
