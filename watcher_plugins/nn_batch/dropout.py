"""Dropout masks as a pure function of (fit, epoch, layer, dataset row, unit).

A unit is kept when a counter-based hash of those five numbers, read as a uniform draw in [0, 1), is
at least p. Nothing is drawn in sequence, so every trainer gets each fit's exact masks whatever it
trains alongside, and a GPU kernel can make a mask in registers, next to the ReLU it multiplies,
instead of writing and reading it back (see pack_kernels.py). The masks of the held-out rows are 1, so one
forward pass gives training-mode outputs on training rows and evaluation-mode ones on held-out rows.

The hash is MurmurHash3's 32-bit finaliser, chained: ``row_hash = fmix32(layer_key ^ row)`` and
``draw = fmix32(row_hash + unit) >> 8`` (24 bits, exact in float32), with ``layer_key =
fmix32(fit_key ^ fmix32(epoch * 16 + layer))``. All of it is arithmetic modulo 2**32, written here
three times with the same results: Python ints (the keys), numpy uint32 arrays (the reference, on the
host, for any device) and Triton (pack_kernels.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from watcher_plugins.nn_batch.protocol import MAX_LAYERS

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
#: A fit's key is derived from its init seed with this offset, apart from the initial weights' stream.
_KEY_OFFSET = 0x9E3779B9
#: Draws are 24-bit integers; a draw d means the uniform number d / 2**24.
DRAW_SCALE = 1.0 / (1 << 24)


def fmix32(h: int) -> int:
    """MurmurHash3's finaliser on a Python int (a bijection of 32-bit integers)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 13
    h = (h * _M2) & MASK32
    return h ^ (h >> 16)


def fit_key(init_seed: int) -> int:
    """A fit's 32-bit dropout key, from the seed its initial weights come from."""
    seed = (int(init_seed) + _KEY_OFFSET) % (1 << 64)
    return fmix32(fmix32(seed & MASK32) ^ (seed >> 32))


def epoch_salt(epoch: int, layer: int) -> int:
    """The (epoch, layer) counter that, hashed with a fit's key, keys one layer's mask in one epoch."""
    if not 0 <= layer < MAX_LAYERS:
        raise ValueError(f"dropout supports at most {MAX_LAYERS} hidden layers")
    return (epoch * MAX_LAYERS + layer) & MASK32


def layer_key(key: int, epoch: int, layer: int) -> int:
    return fmix32(key ^ fmix32(epoch_salt(epoch, layer)))


def fmix32_array(h: np.ndarray) -> np.ndarray:
    """fmix32 element-wise, in place, on a uint32 array (numpy's uint32 arithmetic wraps modulo 2**32)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(_M1)
    h ^= h >> np.uint32(13)
    h *= np.uint32(_M2)
    h ^= h >> np.uint32(16)
    return h


def keep_factor(p: float) -> float:
    """The value of a kept unit, 1/(1-p), as float32 rounds it (1 when p = 0)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def draws(layer_keys: Sequence[int], rows: torch.Tensor, width: int) -> torch.Tensor:
    """Uniform draws in [0, 1), float32, [len(layer_keys), len(rows), width]: the reference, computed
    on the host in uint32 and returned on the rows' device. ``rows`` are dataset row indices."""
    keys = np.asarray(layer_keys, dtype=np.uint32).reshape(-1, 1, 1)
    rows_u32 = rows.detach().cpu().numpy().astype(np.uint32).reshape(1, -1, 1)
    row_hash = fmix32_array(keys ^ rows_u32)
    h = fmix32_array(row_hash + np.arange(width, dtype=np.uint32))  # [keys, rows, width], wraps
    h >>= np.uint32(8)
    return torch.from_numpy(h.astype(np.float32) * np.float32(DRAW_SCALE)).to(rows.device)


def dropout_mask(key: int, epoch: int, layer: int, rows: torch.Tensor, width: int, p: float) -> torch.Tensor:
    """One fit's mask of one hidden layer in one epoch on the given (training) rows: [len(rows), width],
    ``keep_factor(p)`` on kept units and 0 on dropped ones, float32, on the rows' device."""
    device = rows.device
    kept = draws([layer_key(key, epoch, layer)], rows, width)[0] >= torch.tensor(p, dtype=torch.float32, device=device)
    return torch.where(kept, torch.tensor(keep_factor(p), device=device), torch.zeros((), device=device))
