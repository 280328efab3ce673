"""A fused pack's matmuls, with weight gradients split along the rows (split-K) on CUDA devices.

A layer's weight gradient is ``h^T @ grad``: a reduction over every row of the dataset (K ~ 10^5) into
a small output ([in, out] per model). cuBLAS's batched GEMM gives one thread block per output tile and
does not split K, so a pack of small models (5 fits of 64 -> 32 units: five 64x64 tiles) runs that
product on five of the GPU's 132 multiprocessors for milliseconds. ``weight_grad`` cuts the rows into
chunks, computes one partial product per (model, chunk) in a single batched GEMM and sums the partials
in float32, so that the whole GPU works. On a CPU, and where the tiles already fill the GPU, it is the
plain product.

``affine`` is the forward ``h @ w (+ bias)`` (batched, or one wide matmul for layer 0) whose backward
uses ``weight_grad``. Its numbers are the plain matmul's up to the order of the float32 sums.
"""

from __future__ import annotations

import functools
import math

import torch

#: Split until the output tiles times the chunks give this many thread blocks per multiprocessor; 0
#: turns splitting off (bench/nn_profile.py's --split-k both compares the two).
BLOCKS_PER_SM = 2
#: A chunk keeps at least this many rows, so that each partial product stays a real GEMM.
MIN_CHUNK_ROWS = 1024
#: The output tile edge the split plans with (cuBLAS's float32 GEMMs use 64- to 256-wide tiles).
TILE = 64


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_splits(batch: int, rows: int, n_in: int, n_out: int, device: torch.device) -> int:
    """How many row chunks ``weight_grad`` cuts ``batch`` products of [rows, n_in]^T [rows, n_out] into."""
    if device.type != "cuda" or BLOCKS_PER_SM <= 0:
        return 1
    tiles = batch * math.ceil(n_in / TILE) * math.ceil(n_out / TILE)
    wanted = math.ceil(BLOCKS_PER_SM * _multiprocessors(device) / tiles)
    splits = min(wanted, rows // MIN_CHUNK_ROWS)
    if splits <= 1:
        return 1
    # Only a split that divides the rows makes the chunks of a batch of activations views, with no
    # remainder; any other would copy the activation and its gradient (gigabytes for a wide pack) on every
    # step, outside what the VRAM budget measured. So: the divisor nearest the wanted split, from a
    # quarter of it to four times it; without one (a prime row count, say) no split, except for a batch
    # of one (layer 0's wide matmul), whose rows slice as views whatever the split.
    nearby = sorted(range(max(2, splits // 4), 4 * splits + 1), key=lambda s: abs(s - splits))
    divisor = next((s for s in nearby if rows % s == 0 and rows // s >= MIN_CHUNK_ROWS), None)
    if divisor is not None:
        return divisor
    return splits if batch == 1 else 1


def _partial_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm(a^T, b) for a [B, R, I], b [B, R, O]; half-precision inputs give float32 sums on CUDA."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a.transpose(1, 2), b, out_dtype=torch.float32)
    return torch.bmm(a.transpose(1, 2), b)


def weight_grad(a: torch.Tensor, b: torch.Tensor, splits: int) -> torch.Tensor:
    """``a^T @ b`` per batch entry, a [B, R, I] and b [B, R, O] -> [B, I, O], its R rows cut into
    ``splits`` chunks whose partial products are summed in float32 or wider (splits=1: one bmm).
    Float32 comes back for half-precision inputs: the weights it is the gradient of are float32."""
    if splits <= 1:
        return _partial_products(a, b)
    batch, rows, n_in = a.shape
    n_out = b.shape[2]
    chunk = rows // splits
    main = chunk * splits
    # [B, S*chunk, X] -> [B*S, chunk, X]: a view where S*chunk == R or B == 1 (row_splits sees to it)
    a_main = a[:, :main].reshape(batch * splits, chunk, n_in)
    b_main = b[:, :main].reshape(batch * splits, chunk, n_out)
    partials = _partial_products(a_main, b_main).view(batch, splits, n_in, n_out)
    grad = partials.sum(1, dtype=torch.promote_types(partials.dtype, torch.float32))
    if main < rows:
        grad += _partial_products(a[:, main:], b[:, main:])
    return grad


class _Affine(torch.autograd.Function):
    """h @ w (+ bias): h [B, R, I] with w [B, I, O] and bias [B, 1, O] (batched), or h [R, I] with w
    [I, O] and bias [1, O] (one wide matmul; no gradient for h, the input data)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if h.dim() == 2:
            out = torch.addmm(bias, h, w) if bias is not None else torch.mm(h, w)
        else:
            out = torch.baddbmm(bias, h, w) if bias is not None else torch.bmm(h, w)
        ctx.save_for_backward(h, w)
        ctx.has_bias = bias is not None
        ctx.compute_dtype = out.dtype  # under autocast, the dtype the matmul ran in
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w = ctx.saved_tensors
        dtype = ctx.compute_dtype
        h, w, grad = h.to(dtype), w.to(dtype), grad.to(dtype)
        wide = h.dim() == 2  # layer 0's one wide matmul, computed as a batch of one
        if wide:
            h, w, grad = h.unsqueeze(0), w.unsqueeze(0), grad.unsqueeze(0)
        grad_h = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.bmm(grad, w.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            batch, rows, n_in = h.shape
            splits = row_splits(batch, rows, n_in, grad.shape[2], grad.device)
            grad_w = weight_grad(h, grad.contiguous(), splits)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(1, keepdim=True, dtype=torch.float32)
        if wide:
            grad_h = None if grad_h is None else grad_h.squeeze(0)
            grad_w = None if grad_w is None else grad_w.squeeze(0)
            grad_bias = None if grad_bias is None else grad_bias.squeeze(0)
        return grad_h, grad_w, grad_bias


def affine(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``h @ w + bias`` as torch's (b)addbmm / addmm compute it, with a row-split weight gradient."""
    return _Affine.apply(h, w, bias)
