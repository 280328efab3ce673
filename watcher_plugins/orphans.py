"""Worker processes end with the process that started them."""

from __future__ import annotations

import os
import threading
import time


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
