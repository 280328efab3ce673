"""The fused trainer: many fits trained at once in packs (pack.py), within a VRAM budget.

Packs are planned by exact architecture first (``plan_groups``): a pack's activations are allocated at
its widest model, so only architectures with fewer than ``MIN_EXACT_PACK`` fits are merged, per depth,
into a padded pack. A fit's numbers are the same in any pack (pack.py): planning changes speed and
memory only. Fits that stop early leave their pack, which is compacted once a quarter has left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from watcher_plugins.nn_batch.budget import VramBudget
from watcher_plugins.nn_batch.pack import FitPack, new_pack
from watcher_plugins.nn_batch.training import FitTask, OutcomeCallback, Trainer, TrainSettings

#: An architecture with at least this many fits in a batch gets packs of its own (no padding); fewer
#: fits of one depth are merged into one padded pack.
MIN_EXACT_PACK = 4


class _RepackNeeded(Exception):
    """The first measured step showed that this pack exceeds the calibrated budget."""


class FusedTrainer(Trainer):
    name = "fused"

    def __init__(self, settings: TrainSettings, device: torch.device, pack_hook=None,
                 budget: VramBudget | None = None, cuda_graphs: bool = True):
        super().__init__(settings, device, pack_hook, cuda_graphs)
        self.budget = budget  # None: packs of n_concurrent; else packs sized by the budget, at most that
        self.pack_sizes: list[int] = []

    @staticmethod
    def plan_groups(tasks: Sequence[FitTask]) -> list[list[FitTask]]:
        """Tasks by (dataset, depth), depths in order of first appearance. Inside a depth, each
        architecture with at least ``MIN_EXACT_PACK`` fits is a group of its own (no padding), widest
        first; the other architectures of that depth form one padded group, widest first, so that a pack
        pads little. Inside a group, fits without dropout come first, so that they tend to share packs
        that draw no masks."""
        depths: dict[tuple[str, int], dict[tuple[int, ...], list[FitTask]]] = {}
        for task in tasks:
            by_arch = depths.setdefault((task.data.key, len(task.job.hidden_layers)), {})
            by_arch.setdefault(tuple(task.job.hidden_layers), []).append(task)

        def order(group: list[FitTask]) -> list[FitTask]:
            return sorted(group, key=lambda t: (tuple(-w for w in t.job.hidden_layers), t.job.dropout > 0))

        groups = []
        for by_arch in depths.values():
            archs = sorted(by_arch, key=lambda a: tuple(-w for w in a))
            groups += [order(by_arch[a]) for a in archs if len(by_arch[a]) >= MIN_EXACT_PACK]
            small = [t for a in archs if len(by_arch[a]) < MIN_EXACT_PACK for t in by_arch[a]]
            if small:
                groups.append(order(small))
        return groups

    def _pack_size(self, queue: Sequence[FitTask], cap: int) -> int:
        if self.budget is None:
            return max(1, min(cap, len(queue)))
        data = queue[0].data
        return self.budget.pack_size([t.job.hidden_layers for t in queue], data.n_rows, data.n_features,
                                     self.settings.precision, any(t.job.dropout > 0 for t in queue), cap)

    def train(self, tasks: Sequence[FitTask], n_concurrent: int, on_done: OutcomeCallback) -> None:
        for group in self.plan_groups(tasks):
            queue = list(group)
            while queue:
                size = self._pack_size(queue, n_concurrent)
                try:
                    self._train_pack(queue[:size], on_done)
                except _RepackNeeded:
                    continue  # nothing of that pack was reported; plan again with the calibrated budget
                queue = queue[size:]
        self.running = []

    def _peak_meter(self) -> Callable[[], int] | None:
        """Where the budget still wants its correction for this precision (on CUDA), start measuring the
        device's peak memory and return what reads the bytes allocated above this point; else None."""
        if self.budget is None or self.device.type != "cuda" \
                or self.budget.is_calibrated(self.settings.precision):
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        return lambda: torch.cuda.max_memory_allocated(self.device) - base

    def _train_pack(self, tasks: Sequence[FitTask], on_done: OutcomeCallback) -> None:
        self._starting(tasks)
        peak = self._peak_meter() if self.settings.max_epochs >= 2 else None
        pack = new_pack(tasks, self.settings, self.device)
        if peak is not None:
            for _ in range(2):  # the first step and the evaluation after it
                pack.run_epoch()
            # _RepackNeeded abandons the pack here: it is not counted in pack_sizes nor model_epochs.
            self._calibrate(pack, peak())
        self.pack_sizes.append(pack.size)
        self.model_epochs += pack.epoch * pack.size
        self.run_pack(pack, on_done)

    def _calibrate(self, pack: FitPack, measured: int) -> None:
        data = pack.data
        widths = [t.job.hidden_layers for t in pack.tasks]
        dropout = any(p > 0 for p in pack.dropout)
        assert self.budget is not None  # calibrated only where a budget sizes the packs
        self.budget.calibrate(self.settings.precision,
                              self.budget.pack_bytes(widths, data.n_rows, data.n_features,
                                                     self.settings.precision, dropout), measured)
        if self.budget.pack_bytes(widths, data.n_rows, data.n_features, self.settings.precision,
                                  dropout) > 1.1 * self.budget.budget_bytes and pack.size > 1:
            raise _RepackNeeded()
