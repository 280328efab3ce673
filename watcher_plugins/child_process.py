"""One worker child process, as both executors run theirs (nn_batch/client.py, tree_parallel/slots.py).

- Start: a fresh interpreter (never a fork of the host), with CUDA_VISIBLE_DEVICES narrowed to its one
  GPU, or emptied for a CPU child, before it starts (devices.pin_environment), and this package on its
  PYTHONPATH. A child stopped before it started never starts.
- Channel: one JSON object a line on its stdin and on its stdout. A reader thread parses each stdout
  line and checks it against the protocol's schema (schemas/); a line that is not JSON, or that the
  schema refuses, is delivered as a BadLine that names the JSON path and what was expected. The end of
  stdout is delivered as None.
- Stderr: appended to a log file (the tail written since this child started is quoted when it dies), or
  drained by a thread into a ring of its last lines; either way the child never blocks on a full pipe.
- Stop: ask (a request, then its stdin closed), wait until a deadline, SIGKILL, and wait at most
  KILL_WAIT_S more. A process stuck in the kernel (a hung GPU driver call) outlives SIGKILL: it is left
  behind with a warning rather than waited for forever.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

import watcher_plugins
from watcher_plugins.devices import pin_environment
from watcher_plugins.schema_files import read_schema

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(watcher_plugins.__file__).resolve().parent.parent)
#: How long a SIGKILLed child may take to exit: longer, it is stuck in the kernel (a hung GPU driver call).
KILL_WAIT_S = 10.0
#: How long a child whose stdout has ended may take to exit before it is killed.
EXIT_WAIT_S = 10.0
#: How long its stderr may take to drain after it exited (its last words, before the tail is read).
STDERR_DRAIN_WAIT_S = 5.0


class ProtocolSchema:
    """One side's messages of a JSON-lines protocol: a definition in a schema file of schemas/, checked
    once, with every problem reported as ``$.json.path: what was expected``."""

    def __init__(self, filename: str, definition: str):
        whole = read_schema(filename)
        schema = {"$schema": whole["$schema"], "$defs": whole["$defs"], "$ref": f"#/$defs/{definition}"}
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        self._validator = cls(schema)

    def problem(self, message: Any) -> str | None:
        """What is wrong with ``message``, or None if the schema allows it."""
        errors = sorted((_meant(e) for e in self._validator.iter_errors(message)),
                        key=lambda e: (_where(e), e.message))
        return "; ".join(f"{_where(e)}: {_message(e)}" for e in errors) or None


def _message(error: ValidationError) -> str:
    # A schema may say in words what a keyword such as anyOf expects ("x-expected", as the params schemas do).
    expected = error.schema.get("x-expected") if isinstance(error.schema, dict) else None
    if expected and error.validator in ("oneOf", "anyOf"):
        return f"{json.dumps(error.instance)} is not valid: expected {expected}"
    return error.message


def _where(error: ValidationError) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)


@cache
def protocol_schema(filename: str, definition: str) -> ProtocolSchema:
    return ProtocolSchema(filename, definition)


def _meant(error: ValidationError) -> ValidationError:
    """Of a oneOf's (anyOf's) errors, the innermost of the branch the message means: the branch whose
    constants (``"event": "fold"``) it has. Otherwise the error itself."""
    while error.validator in ("oneOf", "anyOf") and error.context and isinstance(error.instance, dict):
        branches = error.schema.get(error.validator, [])
        meant = [i for i, branch in enumerate(branches) if _constants(branch)
                 and all(error.instance.get(key) == value for key, value in _constants(branch).items())]
        if len(meant) != 1:
            break
        inner = [e for e in error.context if e.schema_path and e.schema_path[0] == meant[0]]
        if not inner:
            break
        error = best_match(inner)
    return error


def _constants(branch: Any) -> dict:
    properties = branch.get("properties", {}) if isinstance(branch, dict) else {}
    return {key: sub["const"] for key, sub in properties.items() if isinstance(sub, dict) and "const" in sub}


@dataclass(frozen=True)
class BadLine:
    """A stdout line of the child's that is not a message of its protocol."""

    raw: bytes
    problem: str  # completes "a line that ...": "is not JSON", "its protocol does not allow: $.x: ..."

    def __str__(self) -> str:
        return f"a line that {self.problem}: {self.raw[:200]!r}"


Delivery = Callable[[dict | BadLine | None], None]


def child_environment(gpu: int | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child pinned to ``gpu`` (None: no GPU at all), plus ``extra``."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return pin_environment(env, gpu)


class ChildProcess:
    """``argv`` as a child process speaking JSON lines. Each stdout line goes to ``deliver`` (from the
    reader thread) as a message the ``replies`` schema allows, a BadLine, or None at the end of stdout.
    Stderr goes to ``stderr_log`` (appended to), or
    else into ``stderr_tail``, a ring of its last ``stderr_lines`` non-empty lines; with ``stderr_marker``,
    a line starting with it is kept out of the ring and empties ``stderr_since_marker`` (what the child
    wrote since, say, its current task began)."""

    def __init__(self, argv: Sequence[str], label: str, deliver: Delivery, *, gpu: int | None = None,
                 env: Mapping[str, str] | None = None, replies: ProtocolSchema | None = None,
                 stderr_log: Path | None = None,
                 stderr_lines: int = 20, stderr_marker: str | None = None):
        self.argv = list(argv)
        self.label = label
        self.gpu = gpu
        self._deliver = deliver
        self._env = dict(env or {})
        self._replies = replies
        self.stderr_log = stderr_log
        self._log_start = 0
        self.stderr_tail: deque[str] = deque(maxlen=stderr_lines)
        self.stderr_since_marker: deque[str] = deque(maxlen=stderr_lines)
        self._marker = stderr_marker
        self._stderr_reader: threading.Thread | None = None
        self.process: subprocess.Popen | None = None
        self.stdout_closed = False  # its end of stream is delivered (or on its way)
        # kill() may come from another thread (an executor closing) before the process exists: then it
        # is never started. The lock orders that against Popen.
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> bool:
        """Start the process; False if it was stopped before it started (it never will)."""
        env = child_environment(self.gpu, self._env)
        stderr: IO | int = subprocess.PIPE
        if self.stderr_log is not None:
            self.stderr_log.parent.mkdir(parents=True, exist_ok=True)
            stderr = self.stderr_log.open("ab")
            self._log_start = stderr.seek(0, os.SEEK_END)
        try:
            with self._lock:
                if self._stopped:
                    return False
                self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=stderr, env=env, close_fds=True)
        finally:
            if not isinstance(stderr, int):
                stderr.close()
        name = self.label.replace(" ", "-")
        threading.Thread(target=self._read_stdout, args=(self.process.stdout,), daemon=True,
                         name=f"{name}-stdout").start()
        if self.process.stderr is not None:
            self._stderr_reader = threading.Thread(target=self._drain_stderr, args=(self.process.stderr,),
                                                   daemon=True, name=f"{name}-stderr")
            self._stderr_reader.start()
        return True

    def _read_stdout(self, stream: IO[bytes]) -> None:
        with stream:  # at the child's end, its pipe is closed here, not whenever it is collected
            for raw in stream:
                self._deliver(self._parse(raw))
        self.stdout_closed = True
        self._deliver(None)

    def _parse(self, raw: bytes) -> dict | BadLine:
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
            return BadLine(raw, "is not JSON")
        problem = self._replies.problem(message) if self._replies is not None else (
            None if isinstance(message, dict) else "$: not a JSON object")
        if problem is not None:
            return BadLine(raw, f"its protocol does not allow: {problem}")
        return message

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        # A library's stray non-UTF-8 byte must not end this thread (the child would block on a full
        # pipe): it is kept escaped instead.
        with io.TextIOWrapper(stream, encoding="utf-8", errors="backslashreplace") as text:
            for line in text:
                line = line.rstrip()
                if self._marker is not None and line.startswith(self._marker):
                    self.stderr_since_marker.clear()
                elif line:
                    self.stderr_tail.append(line)
                    self.stderr_since_marker.append(line)
                    log.debug("%s: %s", self.label, line)

    def last_stderr(self, lines: int) -> list[str]:
        """The last ``lines`` non-empty lines this process wrote to stderr (to its log: since it started)."""
        if self.stderr_log is None:
            return list(self.stderr_tail)[-lines:]
        try:
            with self.stderr_log.open("rb") as fh:
                fh.seek(self._log_start)
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return [line for line in text.strip().splitlines() if line.strip()][-lines:]

    def send(self, message: dict) -> bool:
        """Write one line; False if the child is gone (its end of stream is on its way)."""
        try:
            stdin = self.process.stdin if self.process is not None else None
            if stdin is None:
                return False  # not started
            stdin.write(json.dumps(message).encode("utf-8") + b"\n")
            stdin.flush()
            return True
        except (AttributeError, BrokenPipeError, OSError, ValueError):  # not started, dead, stdin closed
            return False

    def close_stdin(self) -> None:
        try:
            if self.process is not None and self.process.stdin is not None:
                self.process.stdin.close()
        except (AttributeError, OSError):
            pass

    def ask_to_stop(self, request: dict) -> None:
        """Send ``request`` (its protocol's shutdown) and close its stdin: an idle child exits at once."""
        if self.alive:
            self.send(request)
            self.close_stdin()

    def wait(self, timeout: float) -> bool:
        """Whether it exited within ``timeout`` seconds."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, deadline: float) -> bool:
        """Wait until ``deadline`` (time.monotonic()) for it to exit, then kill it; whether it is gone."""
        return self.wait(deadline - time.monotonic()) or self.kill_and_wait()

    def kill(self) -> None:
        """SIGKILL it now, without waiting; one not started yet never starts."""
        with self._lock:
            self._stopped = True
        if self.alive and self.process is not None:  # alive implies started
            self.process.kill()

    def kill_and_wait(self, wait_s: float | None = None, consequence: str = "left behind") -> bool:
        """SIGKILL it and wait at most ``wait_s`` (KILL_WAIT_S) for it to exit; whether it did. One that
        does not is logged, with ``consequence``, and left behind."""
        wait_s = KILL_WAIT_S if wait_s is None else wait_s
        self.kill()
        if self.process is None:
            return True
        gone = self.wait(wait_s)
        if not gone:
            log.warning("%s (pid %d) did not exit within %gs of SIGKILL (stuck in the kernel, as in a hung GPU "
                        "driver call); %s", self.label, self.process.pid, wait_s, consequence)
        self.close_stdin()
        return gone

    def exit_code(self) -> int | None:
        """Its exit status (negative: the signal), once it has exited: waited for EXIT_WAIT_S, then killed.
        None if it outlived SIGKILL too. Its stderr is drained first (its last words)."""
        if self.process is None:
            return None
        if not self.wait(EXIT_WAIT_S):
            self.kill_and_wait()
        if self._stderr_reader is not None:
            self._stderr_reader.join(timeout=STDERR_DRAIN_WAIT_S)
        return self.process.returncode
