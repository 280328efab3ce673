"""Fault injection for the NN worker, read from $WATCHER_NN_FAULTS (a JSON object), for tests.

It makes real faults happen at chosen points, so that the recovery code runs as it would on a GPU:

- ``oom_at_concurrency: K`` — raise torch.cuda.OutOfMemoryError whenever K or more fits start together;
- ``cuda_error_on_trial: T`` — raise a CUDA runtime error when a fit of trial T starts (fatal for the worker);
- ``crash_on_trial: T`` — the worker process dies (os._exit) when a fit of trial T starts; with
  ``crash_once_marker: FILE`` only while FILE does not exist yet (it is created just before dying);
- ``hang_on_trial: T`` — the worker stops answering (sleeps) when a fit of trial T starts, as a wedged
  driver call would;
- ``noise: true`` — write to stdout at the Python and the file-descriptor level while training, as a
  chatty library would.

Unset, nothing is injected and the hook costs nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

FAULTS_ENV = "WATCHER_NN_FAULTS"
CRASH_EXIT_CODE = 17


@dataclass(frozen=True)
class Faults:
    oom_at_concurrency: int | None = None
    cuda_error_on_trial: int | None = None
    crash_on_trial: int | None = None
    crash_once_marker: str | None = None
    hang_on_trial: int | None = None
    noise: bool = False

    @classmethod
    def from_env(cls) -> Faults:
        text = os.environ.get(FAULTS_ENV)
        return cls(**json.loads(text)) if text else cls()

    @property
    def active(self) -> bool:
        return self != Faults()

    def before_pack(self, tasks: Sequence) -> None:
        """The trainers' pack hook: called with the fits about to start together."""
        trials = {task.key[0] for task in tasks}
        if self.noise:
            print("noise from a library's print()")
            sys.stdout.flush()
            os.write(1, b"noise written to file descriptor 1\n")
        if self.crash_on_trial in trials:
            marker = Path(self.crash_once_marker) if self.crash_once_marker else None
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.touch()
                os._exit(CRASH_EXIT_CODE)
        if self.hang_on_trial in trials:
            time.sleep(3600)
        if self.cuda_error_on_trial in trials:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if self.oom_at_concurrency is not None and len(tasks) >= self.oom_at_concurrency:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (injected at concurrency {len(tasks)} >= {self.oom_at_concurrency})")
