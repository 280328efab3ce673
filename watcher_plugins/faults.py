"""Fault injection, for tests only: nothing in a real run sets it, and a real run must not.

The tests make real faults happen at chosen points in the worker processes, so that the recovery code
runs as it would when a GPU runs out of memory, a library segfaults or a driver call hangs. There is one
way in: the environment variable ``WATCHER_FAULTS``, a JSON object whose keys name faults and whose
values are their arguments. Each worker process reads it once, when it starts (``current()``), and the
workers inherit it from the test process, so a test sets it (``encode`` checks it) before the executor
starts its workers. Unset, ``current()`` is inactive: nothing is injected and the injection points cost
a test of one attribute.

NN worker (``nn_batch/worker.py``), at each pack of fits about to start together
(``Faults.before_pack``, the trainers' pack hook; T is a trial number):

- ``nn_oom_at_concurrency: K`` -- raise torch.cuda.OutOfMemoryError whenever K or more fits start
  together;
- ``nn_cuda_error_on_trial: T`` -- raise a CUDA runtime error when a fit of trial T starts (fatal for
  the worker);
- ``nn_crash_on_trial: T`` -- the worker process dies (``os._exit(17)``) when a fit of trial T starts;
  with ``nn_crash_once_marker: FILE`` only while FILE does not exist yet (it is created just before);
- ``nn_hang_on_trial: T`` -- the worker stops answering (sleeps an hour) when a fit of trial T starts,
  as a wedged driver call would;
- ``nn_noise: true`` -- write to stdout at the Python and at the file-descriptor level while training,
  as a chatty library would.

Tree worker (``tree_parallel/worker.py``), as a worker begins a trial's folds (``Faults.tree_trial``):

- ``tree_trials: {"MODEL_TYPE:TRIAL": FAULT, ...}`` -- the fault of that trial (``trial_key``), in every
  worker that trains its folds and on every try. FAULT is one of

  - ``"abort"`` -- the worker dies of SIGABRT, as from a segfault;
  - ``"abort_once:PATH"`` -- the same unless PATH exists (created first, atomically: of the workers
    training the trial's folds at once, one dies);
  - ``"abort_once_per_fold:DIR"`` -- the same with a file in DIR for each set of folds sent: every fold
    dies on its first try;
  - ``"sleep:SECONDS"`` -- sleep first: a long trial, to be killed mid-way or to run past its timeout;
  - ``"stderr:TEXT"`` -- write TEXT to stderr, then train;
  - ``"stderr_latin1:TEXT"`` -- the same, encoded as Latin-1: bytes that are not UTF-8, as a library
    may write;
  - ``"orphan_pipes:PATH"`` -- die, leaving a forked child that holds the worker's pipes open until
    PATH exists (at most 120 s);
  - ``"catboost_gpu_oom"`` -- die as CatBoost does when a GPU fit outgrows its memory reserve (its
    last stderr lines, then SIGABRT), unless the reserve is CatBoost's default: a fold that needs it all;
  - ``"bad_reply"`` -- send a fold reply the protocol's schema refuses, then train;
  - ``{"ledger": PATH, "rendezvous": N, "gate": PATH, "hold_s": S}`` (all but ledger optional) --
    append the trial's "enter" and "leave" (with its worker's GPU and pid) to the file PATH around the
    trial, one O_APPEND write each, so that the file's order is the order they happened in and the
    GPU-sharing tests see overlaps without a clock. After entering, wait until N trials of its model
    type have entered on its GPU and until the gate file exists (at most 60 s), then sleep S seconds.

The value travels in the environment, so it is small: Linux allows one variable at most 128 KiB.
An unknown key, tree fault or argument is an error when the variable is read: a worker started with
one fails to start, and ``encode`` fails in the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

ENV = "WATCHER_FAULTS"
#: The exit status of an NN worker that nn_crash_on_trial kills.
CRASH_EXIT_CODE = 17
#: The tree faults written as strings: KIND or KIND:ARGUMENT.
TREE_KINDS = frozenset({"abort", "abort_once", "abort_once_per_fold", "sleep", "stderr", "stderr_latin1",
                        "orphan_pipes", "catboost_gpu_oom", "bad_reply"})
_TREE_KINDS_WITH_ARGUMENT = frozenset({"abort_once", "abort_once_per_fold", "sleep", "stderr", "stderr_latin1",
                                       "orphan_pipes"})


def trial_key(model_type: str, trial_number: int) -> str:
    """The key of a trial in ``tree_trials``."""
    return f"{model_type}:{trial_number}"


@dataclass(frozen=True)
class TreeFault:
    """One of the string tree faults: ``kind`` (TREE_KINDS) and its argument ("" if none)."""

    kind: str
    arg: str = ""

    @classmethod
    def parse(cls, text: str) -> TreeFault:
        kind, _, arg = text.partition(":")
        if kind not in TREE_KINDS:
            raise ValueError(f"{ENV}: tree fault {text!r}: {kind!r} is not one of {sorted(TREE_KINDS)}")
        if (kind in _TREE_KINDS_WITH_ARGUMENT) != bool(arg):
            raise ValueError(f"{ENV}: tree fault {text!r}: {kind} takes "
                             + ("an argument (KIND:ARGUMENT)" if kind in _TREE_KINDS_WITH_ARGUMENT else "no argument"))
        if kind == "sleep":
            float(arg)
        return cls(kind, arg)


@dataclass(frozen=True)
class Ledger:
    """The ledger tree fault (see the module's docstring)."""

    path: str
    rendezvous: int = 0
    gate: str | None = None
    hold_s: float = 0.0

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> Ledger:
        unknown = set(obj) - {"ledger", "rendezvous", "gate", "hold_s"}
        if "ledger" not in obj or unknown:
            raise ValueError(f"{ENV}: ledger fault {dict(obj)!r}: needs ledger, allows rendezvous, gate and hold_s")
        return cls(str(obj["ledger"]), int(obj.get("rendezvous", 0)),
                   None if obj.get("gate") is None else str(obj["gate"]), float(obj.get("hold_s", 0)))


@dataclass(frozen=True)
class Faults:
    """The faults a worker process injects; ``Faults()`` injects none. Fields are the env's keys."""

    nn_oom_at_concurrency: int | None = None
    nn_cuda_error_on_trial: int | None = None
    nn_crash_on_trial: int | None = None
    nn_crash_once_marker: str | None = None
    nn_hang_on_trial: int | None = None
    nn_noise: bool = False
    tree_trials: Mapping[str, TreeFault | Ledger] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> Faults:
        if not isinstance(obj, dict):
            raise ValueError(f"{ENV} must be a JSON object, not {obj!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"{ENV}: unknown fault(s) {unknown}; known: {sorted(names)}")
        values = dict(obj)
        trials = values.pop("tree_trials", {})
        if not isinstance(trials, dict):
            raise ValueError(f"{ENV}: tree_trials must map MODEL_TYPE:TRIAL to a fault")
        tree: dict[str, TreeFault | Ledger] = {
            str(key): Ledger.parse(fault) if isinstance(fault, dict) else TreeFault.parse(str(fault))
            for key, fault in trials.items()}
        for name in ("nn_oom_at_concurrency", "nn_cuda_error_on_trial", "nn_crash_on_trial", "nn_hang_on_trial"):
            if values.get(name) is not None:
                values[name] = int(values[name])
        return cls(**values, tree_trials=tree)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        text = environ.get(ENV)
        return cls.from_json(json.loads(text)) if text else cls()

    @property
    def active(self) -> bool:
        return self != Faults()

    # --- NN worker -------------------------------------------------------------------------------

    def before_pack(self, tasks: Sequence[Any]) -> None:
        """The NN trainers' pack hook: called with the fits (FitTasks) about to start together."""
        trials = {task.key[0] for task in tasks}
        if self.nn_noise:
            print("noise from a library's print()")
            sys.stdout.flush()
            os.write(1, b"noise written to file descriptor 1\n")
        if self.nn_crash_on_trial in trials:
            marker = Path(self.nn_crash_once_marker) if self.nn_crash_once_marker else None
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.touch()
                os._exit(CRASH_EXIT_CODE)
        if self.nn_hang_on_trial in trials:
            time.sleep(3600)
        if self.nn_cuda_error_on_trial in trials:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if self.nn_oom_at_concurrency is not None and len(tasks) >= self.nn_oom_at_concurrency:
            import torch  # only here: the tree workers read these faults too, and never import torch

            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (injected at concurrency {len(tasks)} >= {self.nn_oom_at_concurrency})")

    # --- tree worker -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def tree_trial(self, model_type: str, trial_number: int, *, gpu: int | None, folds: Sequence[int],
                   catboost_gpu_ram_part: float | None, send: Callable[[dict], None]) -> Iterator[None]:
        """Around a tree worker's training of a trial's ``folds``: that trial's fault, if any. ``gpu``:
        the worker's GPU; ``send``: writes one protocol reply."""
        fault = self.tree_trials.get(trial_key(model_type, trial_number)) if self.tree_trials else None
        if isinstance(fault, Ledger):
            with _ledger(fault, gpu, model_type, trial_number):
                yield
            return
        if isinstance(fault, TreeFault):
            _tree_fault(fault, folds, catboost_gpu_ram_part, send)
        yield


def encode(**faults: Any) -> str:
    """``WATCHER_FAULTS``'s value for these faults, checked: what a test sets."""
    Faults.from_json(faults)
    return json.dumps(faults)


@cache
def current() -> Faults:
    """This process's faults, from ``WATCHER_FAULTS`` (read once)."""
    return Faults.from_env()


def _tree_fault(fault: TreeFault, folds: Sequence[int], catboost_gpu_ram_part: float | None,
                send: Callable[[dict], None]) -> None:
    kind, arg = fault.kind, fault.arg
    if kind == "abort":
        os.abort()
    elif kind == "catboost_gpu_oom" and catboost_gpu_ram_part != _catboost_default_reserve():
        # CatBoost's own last words in that case (an H200, catboost 1.2.10), then its abort.
        sys.stderr.write("catboost/cuda/cuda_lib/memory_pool/stack_like_memory_pool.h:303: Error: Out of memory. "
                         "Requested 0.0263671875 MB; Free 0.01274585724 MB\n"
                         " of type NCudaLib::TOutOfMemoryError\n")
        sys.stderr.flush()
        os.abort()
    elif kind in ("abort_once", "abort_once_per_fold"):
        marker = arg if kind == "abort_once" else os.path.join(arg, "folds-" + "-".join(map(str, folds)))
        try:  # created atomically: of the workers training this trial's folds at once, one aborts
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.abort()
    elif kind == "orphan_pipes":
        # Fork a child that keeps this worker's pipes open until the file ARG exists (at most 120 s), then
        # die: the pool gets no end of stream from this worker.
        if os.fork() == 0:
            deadline = time.monotonic() + 120
            while not os.path.exists(arg) and time.monotonic() < deadline:
                time.sleep(0.1)
            os._exit(0)
        os.abort()
    elif kind == "stderr":
        sys.stderr.write(arg + "\n")
        sys.stderr.flush()
    elif kind == "stderr_latin1":
        sys.stderr.flush()
        sys.stderr.buffer.write(arg.encode("latin-1") + b"\n")
        sys.stderr.buffer.flush()
    elif kind == "sleep":
        time.sleep(float(arg))
    elif kind == "bad_reply":
        send({"event": "fold", "result": {"trial_number": 0, "fold_idx": "first", "model_type": "lightgbm",
                                          "score": None, "seconds": 0.0, "status": "fail", "error": "bad_reply"}})


def _catboost_default_reserve() -> float:
    from watcher_plugins.tree_parallel.libraries import CatBoostFitter  # the tree worker has it loaded

    return CatBoostFitter.DEFAULT_GPU_RAM_PART


@contextlib.contextmanager
def _ledger(ledger: Ledger, gpu: int | None, model_type: str, trial_number: int) -> Iterator[None]:
    path = ledger.path

    def append(event: str) -> None:
        line = json.dumps({"event": event, "gpu": gpu, "model_type": model_type,
                           "trial": trial_number, "pid": os.getpid()}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def entered() -> int:
        with open(path, encoding="utf-8") as f:
            entries = [json.loads(line) for line in f if line.endswith("\n")]
        return sum(1 for e in entries if e["event"] == "enter" and e["gpu"] == gpu and e["model_type"] == model_type)

    append("enter")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (entered() < ledger.rendezvous
                                               or (ledger.gate and not os.path.exists(ledger.gate))):
            time.sleep(0.02)
        time.sleep(ledger.hold_s)
        yield
    finally:
        append("leave")
