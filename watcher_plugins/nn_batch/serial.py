"""The serial trainer, the reference schedule: one fit at a time, each a pack of one (pack.py)."""

from __future__ import annotations

from collections.abc import Sequence

from watcher_plugins.nn_batch.pack import new_pack
from watcher_plugins.nn_batch.training import FitTask, OutcomeCallback, Trainer


class SerialTrainer(Trainer):
    name = "serial"

    def train(self, tasks: Sequence[FitTask], n_concurrent: int, on_done: OutcomeCallback) -> None:
        for task in tasks:
            self._starting([task])
            self.run_pack(new_pack([task], self.settings, self.device), on_done)
        self.running = []
