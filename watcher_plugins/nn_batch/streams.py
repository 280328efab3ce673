"""The streams trainer: the seed's Phase 3A design. Up to ``n_concurrent`` fits at once, each a pack of
one (pack.py) on its own CUDA stream; fits are bucketed by architecture signature and take the
streams round-robin within their bucket. On a CPU the same schedule runs without streams.

DESIGN.md measured this at 0.93-0.96x of serial: one Python thread still issues every kernel. It is
kept as the seed's path and as a second check that a fit's numbers do not depend on its schedule.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

import torch

from watcher_plugins.nn_batch.pack import FitPack, new_pack
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
        max_epochs = self.settings.max_epochs
        for bucket in bucket_by_architecture(tasks):
            n_slots = max(1, min(n_concurrent, len(bucket)))
            streams = [torch.cuda.Stream(self.device) if cuda else None for _ in range(n_slots)]
            for stream in streams:
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream(self.device))  # the dataset was made there
            waiting = deque(bucket)
            free_streams = deque(streams)  # round-robin within the bucket; a finished fit's stream goes last
            active: list[tuple[FitPack, torch.cuda.Stream | None]] = []
            try:
                while waiting or active:
                    starting = [waiting.popleft() for _ in range(min(len(waiting), len(free_streams)))]
                    if starting:  # the pack hook sees every fit that trains with the ones starting now
                        self._starting([pack.tasks[0] for pack, _ in active] + starting)
                    for task in starting:
                        stream = free_streams.popleft()
                        with self._stream_context(stream):
                            pack = new_pack([task], self.settings, self.device)
                        self._begin(pack)
                        active.append((pack, stream))
                    self.running = [pack.tasks[0].key for pack, _ in active]
                    for _ in range(HOST_CHECK_EVERY):
                        for pack, stream in active:
                            if pack.epoch < max_epochs:
                                with self._stream_context(stream):
                                    pack.run_epoch()
                                self.model_epochs += 1
                                if self.on_epoch is not None:
                                    self.on_epoch()
                    synchronize(self.device)
                    still = []
                    for pack, stream in active:
                        if pack.epoch >= max_epochs:
                            pack.finish(on_done)
                        elif not pack.leave_stopped(on_done):
                            still.append((pack, stream))
                            continue
                        self._end(pack)
                        free_streams.append(stream)
                    active = still
            finally:
                for pack, _ in active:
                    self._end(pack)
        self.running = []
