"""The VRAM budget: how many fits a worker trains at once when ``n_concurrent_nn`` is "auto".

The seed's ``estimate_vram_mb`` / ``max_concurrent_for_budget``, made honest in two ways: the total
is the device's free memory (times ``vram_budget_fraction``), and the per-model estimate is scaled by a
correction measured on the first training step of the first pack (peak allocated over estimate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from watcher_plugins.nn_batch.pack_kernels import row_chunks

MIB = 1024 * 1024


def estimate_vram_bytes(hidden_layers: Sequence[int], n_rows: int, n_features: int = 62,
                        precision: str = "fp32", dropout: bool = False) -> int:
    """Bytes one fit of a pack (pack.TritonPack) needs: its parameters with Adam's two moments and its
    share of the weight gradient's row-chunk partials (float32); per row and hidden unit its
    activations, and per row two gradient buffers of its widest layer, its predictions, best
    predictions, loss gradient and early stopping's temporaries. Dropout masks are never stored
    (``dropout`` is accepted for the callers' sake)."""
    widths = [n_features, *hidden_layers, 1]
    layer_params = [a * b + b for a, b in zip(widths[:-1], widths[1:])]
    _chunk_rows, n_chunks = row_chunks(n_rows)
    act_bytes = 2 if precision == "bf16" else 4
    per_row = (sum(hidden_layers) + 2 * max(hidden_layers)) * act_bytes + 4 * 4 + act_bytes + 1
    return sum(layer_params) * 4 * 3 + n_chunks * max(layer_params) * 4 + n_rows * per_row


def estimate_vram_mb(hidden_layers: Sequence[int], n_rows: int, **kwargs) -> float:
    """The seed's name for the estimate, in MiB."""
    return estimate_vram_bytes(hidden_layers, n_rows, **kwargs) / MIB


def padded_widths(width_lists: Sequence[Sequence[int]]) -> list[int]:
    """The widths of a fused pack holding models of these (equal-depth) widths."""
    return [max(widths[i] for widths in width_lists) for i in range(len(width_lists[0]))]


def max_concurrent_for_budget(width_lists: Sequence[Sequence[int]], n_rows: int, budget_bytes: float,
                              **kwargs) -> int:
    """The seed's sizing: how many copies of the worst-case model fit in ``budget_bytes`` (at least 1)."""
    worst = max(estimate_vram_bytes(widths, n_rows, **kwargs) for widths in width_lists)
    return max(1, int(budget_bytes // worst))


def free_device_bytes(device: torch.device) -> int:
    """Memory the worker could still allocate: the device's free memory plus PyTorch's cached blocks."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024 * MIB  # no way to know: assume a modest machine


class VramBudget:
    """Sizes packs from a byte budget and a per-precision correction learnt from one measured step."""

    def __init__(self, budget_bytes: float):
        self.budget_bytes = float(budget_bytes)
        self.corrections: dict[str, float] = {}

    @classmethod
    def for_device(cls, device: torch.device, fraction: float) -> VramBudget:
        return cls(free_device_bytes(device) * fraction)

    def is_calibrated(self, precision: str) -> bool:
        return precision in self.corrections

    def pack_bytes(self, width_lists: Sequence[Sequence[int]], n_rows: int, n_features: int, precision: str,
                   dropout: bool) -> float:
        """Estimated bytes of a fused pack of these models (padded to the widest), corrected."""
        one = estimate_vram_bytes(padded_widths(width_lists), n_rows, n_features, precision, dropout)
        return len(width_lists) * one * self.corrections.get(precision, 1.0)

    def max_concurrent(self, width_lists: Sequence[Sequence[int]], n_rows: int, n_features: int, precision: str,
                       dropout: bool) -> int:
        """How many separate models (each at its own widths) fit at once: the seed's sizing, corrected."""
        correction = self.corrections.get(precision, 1.0)
        return max_concurrent_for_budget(width_lists, n_rows, self.budget_bytes / correction,
                                         n_features=n_features, precision=precision, dropout=dropout)

    def pack_size(self, width_lists: Sequence[Sequence[int]], n_rows: int, n_features: int, precision: str,
                  dropout: bool, cap: int) -> int:
        """How many of these models, taken in order, fit in one pack (at least 1, at most ``cap``)."""
        size = 1
        while size < min(cap, len(width_lists)):
            if self.pack_bytes(width_lists[: size + 1], n_rows, n_features, precision, dropout) > self.budget_bytes:
                break
            size += 1
        return size

    def calibrate(self, precision: str, estimated_bytes: float, measured_bytes: float) -> None:
        """Learn the correction from a pack whose estimate (uncorrected) and measured peak are known."""
        if estimated_bytes > 0 and measured_bytes > 0:
            self.corrections[precision] = measured_bytes / estimated_bytes
