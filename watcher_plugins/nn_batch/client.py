"""Host side of one NN worker process: start it, send requests, read its reply lines. No torch here."""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import watcher_plugins
from watcher_plugins.devices import pin_environment
from watcher_plugins.errors import WorkerCrashed
from watcher_plugins.nn_batch import protocol

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(watcher_plugins.__file__).resolve().parent.parent)
#: How long a worker asked to shut down may take to finish what it is doing.
SHUTDOWN_WAIT_S = 15.0
#: How long a SIGKILLed worker may take to exit: longer, it is stuck in the kernel (a hung GPU driver call).
KILL_WAIT_S = 10.0


def _tail(path: Path | None, start: int, lines: int = 15) -> str:
    """The last lines of ``path`` written after byte ``start``."""
    if path is None:
        return ""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _wait_limit(timeout: float | None) -> float | None:
    """A timeout queue.get accepts: a huge one (a user's "no timeout") is capped at threading.TIMEOUT_MAX."""
    return None if timeout is None else min(timeout, threading.TIMEOUT_MAX)


class WorkerProcess:
    """``python -m watcher_plugins.nn_batch.worker`` for one GPU (or the CPU), with CUDA_VISIBLE_DEVICES
    set before the child starts. Its stderr goes to ``log_path``; a crash's reason quotes the tail of what
    this process wrote there (the log is appended to by every worker of its GPU, in every run)."""

    def __init__(self, gpu: int | None, lease_dir: Path | None = None, lease_timeout: float = 600.0,
                 log_path: Path | None = None):
        self.gpu = gpu
        self.lease_dir = lease_dir
        self.lease_timeout = lease_timeout
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._replies: queue.Queue = queue.Queue()
        self.info: dict = {}
        self._log_start = 0
        # kill() may come from another thread (the executor closing) before the process exists: then it
        # is never started. The lock orders that against Popen.
        self._lock = threading.Lock()
        self._killed = False

    @property
    def label(self) -> str:
        return f"GPU {self.gpu}" if self.gpu is not None else "CPU"

    def start(self) -> dict:
        """Start the process and wait for its ping reply (it first waits for its GPU lease)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "watcher_plugins.nn_batch.worker", "--lease-timeout", str(self.lease_timeout)]
        pin_environment(env, self.gpu)  # a CPU worker must not touch any GPU
        if self.gpu is not None:
            command += ["--device", "cuda", "--gpu", str(self.gpu)]
        else:
            command += ["--device", "cpu"]
        if self.lease_dir is not None:
            command += ["--lease-dir", str(self.lease_dir)]
        stderr: IO | int = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            stderr = self.log_path.open("ab")
            self._log_start = stderr.seek(0, os.SEEK_END)
        try:
            with self._lock:
                if self._killed:
                    raise WorkerCrashed(f"NN worker on {self.label} was stopped before it started")
                self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=stderr, env=env, close_fds=True)
        finally:
            if not isinstance(stderr, int):
                stderr.close()
        threading.Thread(target=self._read_replies, args=(self.process.stdout,), daemon=True,
                         name=f"nn-worker-{self.label}").start()
        self.send({"command": "ping"})
        reply = self.next_reply(timeout=self.lease_timeout + 300)
        if reply.get("event") != "pong":
            self.kill()
            raise WorkerCrashed(f"NN worker on {self.label} did not start: {reply.get('message', reply)}")
        self.info = reply
        return reply

    def _read_replies(self, stream) -> None:
        with stream:  # at the worker's end, its pipe is closed here, not whenever it is collected
            for raw in stream:
                try:
                    self._replies.put(json.loads(raw))
                except ValueError:
                    self._replies.put({"event": "fatal", "code": "bad_reply",
                                       "message": f"the worker wrote a line that is not JSON: {raw[:200]!r}"})
        self._replies.put(None)

    def send(self, request: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise WorkerCrashed(self.exit_reason()) from None

    def next_reply(self, timeout: float | None = None) -> dict:
        """The next reply line; WorkerCrashed if the worker died or sent a fatal line."""
        try:
            reply = self._replies.get(timeout=_wait_limit(timeout))
        except queue.Empty:
            self.kill()
            raise WorkerCrashed(f"NN worker on {self.label} sent nothing for {timeout:g}s") from None
        if reply is None:
            self._replies.put(None)  # stays dead for every later reader
            raise WorkerCrashed(self.exit_reason())
        if reply.get("event") == "fatal":
            self.kill()
            raise WorkerCrashed(f"NN worker on {self.label} stopped: {reply.get('code')}: {reply.get('message')}")
        return reply

    def exit_reason(self) -> str:
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
                code = self.process.returncode
        tail = _tail(self.log_path, self._log_start)
        return f"NN worker on {self.label} exited with code {code}" + (f"; its log ends:\n{tail}" if tail else "")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def shutdown(self) -> None:
        """Ask it to stop, wait up to SHUTDOWN_WAIT_S for it to finish its batch, then kill it."""
        if self.alive:
            try:
                self.send({"command": "shutdown"})
                self.process.stdin.close()
                self.process.wait(timeout=SHUTDOWN_WAIT_S)
            except (WorkerCrashed, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL it and wait up to KILL_WAIT_S; one not started yet never starts."""
        with self._lock:
            self._killed = True
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                # Uninterruptible in the kernel, as in a hung GPU driver call: it dies when that call
                # returns. Its fits are handled as a dead worker's; waiting on would hang the batch.
                log.warning("NN worker on %s (pid %d) did not exit within %gs of SIGKILL (stuck in the "
                            "kernel, as in a hung GPU driver call); left behind",
                            self.label, self.process.pid, KILL_WAIT_S)
        try:
            self.process.stdin.close()
        except OSError:
            pass


def train_batch_request(jobs: list[protocol.FitJob], settings: protocol.BatchSettings) -> dict:
    return {"command": "train_batch", "jobs": [job.to_json() for job in jobs], **settings.to_json()}
