"""Host side of one NN worker process: start it, send requests, read its reply lines. No torch here."""

from __future__ import annotations

import os
import queue
import sys
import threading
from pathlib import Path

from watcher_plugins.child_process import BadLine, ChildProcess, protocol_schema
from watcher_plugins.errors import WorkerCrashed
from watcher_plugins.nn_batch import protocol
from watcher_plugins.records import RefitJob, RefitResult

#: How long a worker asked to shut down may take to finish what it is doing.
SHUTDOWN_WAIT_S = 15.0
#: Lines of its log a crashed worker's reason quotes.
LOG_TAIL_LINES = 15
REPLIES = protocol_schema("worker_protocol.schema.json", "reply")


def _wait_limit(timeout: float | None) -> float | None:
    """A timeout queue.get accepts: a huge one (a user's "no timeout") is capped at threading.TIMEOUT_MAX."""
    return None if timeout is None else min(timeout, threading.TIMEOUT_MAX)


class WorkerProcess:
    """``python -m watcher_plugins.nn_batch.worker`` for one GPU (or the CPU), a ChildProcess with
    CUDA_VISIBLE_DEVICES set before it starts. Its stderr goes to ``log_path``; a crash's reason quotes
    the tail of what this process wrote there (the log is appended to by every worker of its GPU, in every
    run). Its replies are checked against schemas/worker_protocol.schema.json."""

    def __init__(self, gpu: int | None, lease_dir: Path | None = None, lease_timeout: float = 600.0,
                 log_path: Path | None = None):
        self.gpu = gpu
        self.lease_dir = lease_dir
        self.lease_timeout = lease_timeout
        self.log_path = log_path
        self._replies: queue.Queue = queue.Queue()
        self.info: dict = {}
        command = [sys.executable, "-m", "watcher_plugins.nn_batch.worker", "--lease-timeout", str(lease_timeout)]
        if gpu is not None:
            command += ["--device", "cuda", "--gpu", str(gpu)]
        else:
            command += ["--device", "cpu"]
        if lease_dir is not None:
            command += ["--lease-dir", str(lease_dir)]
        # A CPU worker is pinned to no GPU at all: it must not touch any.
        self.child = ChildProcess(command, f"NN worker on {self.label}", self._replies.put, gpu=gpu,
                                  replies=REPLIES, stderr_log=log_path)

    @property
    def label(self) -> str:
        return f"GPU {self.gpu}" if self.gpu is not None else "CPU"

    @property
    def process(self):
        return self.child.process

    def start(self) -> dict:
        """Start the process and wait for its ping reply (it first waits for its GPU lease)."""
        if not self.child.start():
            raise WorkerCrashed(f"NN worker on {self.label} was stopped before it started")
        self.send({"command": "ping"})
        reply = self.next_reply(timeout=self.lease_timeout + 300)
        if reply.get("event") != "pong":
            self.kill()
            raise WorkerCrashed(f"NN worker on {self.label} did not start: {reply.get('message', reply)}")
        self.info = reply
        return reply

    def send(self, request: dict) -> None:
        if not self.child.send(request):
            raise WorkerCrashed(self.exit_reason())

    def next_reply(self, timeout: float | None = None) -> dict:
        """The next reply line; WorkerCrashed if the worker died, sent a fatal line or a line its protocol
        does not allow."""
        try:
            reply = self._replies.get(timeout=_wait_limit(timeout))
        except queue.Empty:
            self.kill()
            raise WorkerCrashed(f"NN worker on {self.label} sent nothing for {timeout:g}s") from None
        if reply is None:
            self._replies.put(None)  # stays dead for every later reader
            raise WorkerCrashed(self.exit_reason())
        if isinstance(reply, BadLine):
            self.kill()
            raise WorkerCrashed(f"NN worker on {self.label} stopped: bad_reply: the worker wrote {reply}")
        if reply.get("event") == "fatal":
            self.kill()
            raise WorkerCrashed(f"NN worker on {self.label} stopped: {reply.get('code')}: {reply.get('message')}")
        return reply

    def exit_reason(self) -> str:
        code = self.child.exit_code()
        tail = "\n".join(self.child.last_stderr(LOG_TAIL_LINES))
        return f"NN worker on {self.label} exited with code {code}" + (f"; its log ends:\n{tail}" if tail else "")

    @property
    def alive(self) -> bool:
        return self.child.alive

    def shutdown(self) -> None:
        """Ask it to stop, wait up to SHUTDOWN_WAIT_S for it to finish its batch, then kill it."""
        if self.alive:
            try:
                self.send({"command": "shutdown"})
            except WorkerCrashed:
                pass
            self.child.close_stdin()
            self.child.wait(SHUTDOWN_WAIT_S)
        self.kill()

    def kill(self) -> None:
        """SIGKILL it and wait up to child_process.KILL_WAIT_S: one stuck in the kernel, as in a hung GPU
        driver call, is left behind (it dies when that call returns) and its fits are handled as a dead
        worker's; waiting on would hang the batch. One not started yet never starts."""
        self.child.kill_and_wait()


def train_batch_request(jobs: list[protocol.FitJob], settings: protocol.BatchSettings) -> dict:
    return {"command": "train_batch", "jobs": [job.to_json() for job in jobs], **settings.to_json()}


def load_refit_arrays(result: RefitResult, path: str) -> RefitResult:
    """``result`` with the oof and predictions a worker wrote to ``path`` (protocol.REFIT_ARRAYS_FILE),
    which is removed once read."""
    import numpy as np

    with np.load(path) as arrays:
        result.oof, result.predictions = arrays["oof"].tolist(), arrays["predictions"].tolist()
    os.remove(path)
    return result


def refit_request(job: RefitJob, settings: protocol.BatchSettings) -> dict:
    """A refit request: the study's settings, so that its folds train as the study's did."""
    return {"command": "refit", "job": job.to_json(), **settings.to_json()}
