"""The streams trainer: the seed's Phase 3A design. Up to ``n_concurrent`` fits at once, each with its
own CUDA stream, its own nn.Module and torch.optim.Adam; fits are bucketed by architecture signature
and take the streams round-robin within their bucket. On a CPU the same schedule runs without streams.

DESIGN.md measured this at 0.93-0.96x of serial: one Python thread still issues every kernel. It is
kept as the seed's path and as a second check of the fit semantics.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

import torch

from watcher_plugins.nn_batch.serial import ModuleFit
from watcher_plugins.nn_batch.training import HOST_CHECK_EVERY, FitTask, OutcomeCallback, Trainer, synchronize


def bucket_by_architecture(tasks: Sequence[FitTask]) -> list[list[FitTask]]:
    """Tasks grouped by hidden_layers signature, buckets in order of first appearance."""
    buckets: dict[tuple[int, ...], list[FitTask]] = {}
    for task in tasks:
        buckets.setdefault(task.job.hidden_layers, []).append(task)
    return list(buckets.values())


class StreamsTrainer(Trainer):
    name = "streams"

    def _stream_context(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def train(self, tasks: Sequence[FitTask], n_concurrent: int, on_done: OutcomeCallback) -> None:
        cuda = self.device.type == "cuda"
        for bucket in bucket_by_architecture(tasks):
            n_slots = max(1, min(n_concurrent, len(bucket)))
            streams = [torch.cuda.Stream(self.device) if cuda else None for _ in range(n_slots)]
            for stream in streams:
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream(self.device))  # the dataset was made there
            waiting = deque(bucket)
            free_streams = deque(streams)  # round-robin within the bucket; a finished fit's stream goes last
            active: list[tuple[ModuleFit, object]] = []
            while waiting or active:
                starting = [waiting.popleft() for _ in range(min(len(waiting), len(free_streams)))]
                if starting:  # the pack hook sees every fit that trains with the ones starting now
                    self._starting([fit.task for fit, _ in active] + starting)
                for task in starting:
                    stream = free_streams.popleft()
                    with self._stream_context(stream):
                        active.append((ModuleFit(task, self.settings, self.device), stream))
                self.running = [fit.task.key for fit, _ in active]
                for _ in range(HOST_CHECK_EVERY):
                    for fit, stream in active:
                        if not fit.at_end:
                            with self._stream_context(stream):
                                fit.run_epoch()
                            self.model_epochs += 1
                synchronize(self.device)
                still = []
                for fit, stream in active:
                    if fit.stopped():
                        on_done(fit.outcome())
                        free_streams.append(stream)
                    else:
                        still.append((fit, stream))
                active = still
        self.running = []
