"""Triton kernels for the dropout of dropout.py, on CUDA devices where Triton is installed.

- ``dropout_mask``: one fit's mask on its training rows (the serial and streams trainers), written
  once, as torch.rand would write its draws: no slower than the generator it replaced.
- ``relu_dropout``: a fused pack's hidden activation, ``relu(z) * mask`` with the mask made in
  registers and never stored; its backward reads the output and makes the mask again:
  ``where(a <= 0, 0, grad * mask)``, torch's relu backward after the mask's. The forward also turns layer 0's
  [rows, N, width] view of the wide matmul into a contiguous [N, rows, width] for the batched matmul.

Each computes the same numbers as the reference (dropout.draws, torch.relu, a multiply in the
activation's dtype): tests/gpu/test_nn_gpu.py compares them bit for bit on random inputs. The torch
path that FusedPack takes without Triton adds the bias the same way (in float32, rounded to the
activation's dtype once), so a pack computes the same numbers with or without Triton.
"""

from __future__ import annotations

import functools
import logging

import torch

from watcher_plugins.nn_batch import dropout as hashing

try:  # Triton ships with CUDA builds of torch; CPU hosts use the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

log = logging.getLogger(__name__)


@functools.cache
def available() -> bool:
    """Triton imports, a CUDA device is there, and a first kernel compiles and runs (a host without a C
    compiler, say, cannot build Triton's launcher): otherwise the trainers use the torch reference."""
    if triton is None or not torch.cuda.is_available():
        return False
    try:
        dropout_mask(hashing.layer_key(hashing.fit_key(0), 0, 0), torch.arange(4, device="cuda"), 4, 0.5)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any failure to build or run means: do without the kernels
        log.warning("Triton kernels unavailable (%s: %s); nn_batch uses torch ops, more slowly",
                    type(exc).__name__, exc)
        return False
    return True


if triton is not None:

    @triton.jit
    def _fmix32(h):
        h ^= h >> 16
        h = h * tl.full((), 0x85EBCA6B, tl.uint32)
        h ^= h >> 13
        h = h * tl.full((), 0xC2B2AE35, tl.uint32)
        return h ^ (h >> 16)

    @triton.jit
    def _draws(lkey, rows, units):
        """Uniform float32 draws [R, W] for dataset rows [R] and units [W] under one layer key."""
        row_hash = _fmix32(lkey ^ rows.to(tl.uint32))
        h = _fmix32(row_hash[:, None] + units.to(tl.uint32)[None, :])
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)

    # Integer arguments that change from call to call are not specialised on (Triton would compile a
    # variant per divisibility and per int32/int64 range) and travel as int32 bit patterns.
    @triton.jit(do_not_specialize=["n", "lkey_bits"])
    def _mask_kernel(rows_ptr, out_ptr, n, width, lkey_bits, p, scale,
                     BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: offsets pass 2**31
        units = tl.arange(0, BLOCK_W)
        in_rows = idx < n
        rows = tl.load(rows_ptr + idx, mask=in_rows, other=0)
        u = _draws(lkey_bits.to(tl.uint32, bitcast=True), rows, units)
        value = tl.where(u >= p, scale, 0.0)
        offs = idx[:, None] * width + units[None, :]
        tl.store(out_ptr + offs, value, mask=in_rows[:, None] & (units[None, :] < width))

    @triton.jit
    def _pack_factor(keys_ptr, p_ptr, scale_ptr, train_ptr, m, rows, units, in_rows, n_rows, epoch_ptr, layer,
                     MAX_LAYERS: tl.constexpr, dtype: tl.constexpr):
        """Model m's dropout mask on these rows and units, float32 holding values of ``dtype``. The epoch is
        read from the device (a CUDA graph replays the launch with the epoch of the replay)."""
        # dropout.epoch_salt: (epoch * MAX_LAYERS + layer) modulo 2**32
        counter = tl.load(epoch_ptr).to(tl.uint32) * MAX_LAYERS + layer.to(tl.uint32)
        lkey = _fmix32(tl.load(keys_ptr + m).to(tl.uint32) ^ _fmix32(counter))
        u = _draws(lkey, rows, units)
        train = tl.load(train_ptr + m * n_rows + rows, mask=in_rows, other=0)
        kept = tl.load(scale_ptr + m).to(dtype).to(tl.float32)  # the mask in the activation's dtype, as torch casts it
        factor = tl.where(u >= tl.load(p_ptr + m), kept, 0.0)
        return tl.where(train[:, None] != 0, factor, 1.0)

    @triton.jit(do_not_specialize=["n_rows", "layer"])
    def _relu_dropout_fwd(z_ptr, bias_ptr, out_ptr, keys_ptr, p_ptr, scale_ptr, train_ptr,
                          n_rows, width, epoch_ptr, layer, zs_m, zs_r, MAX_LAYERS: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_W: tl.constexpr):
        m = tl.program_id(1).to(tl.int64)  # int64 offsets: a pack may hold more than 2**31 activations
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        units = tl.arange(0, BLOCK_W)
        in_rows = rows < n_rows
        inside = in_rows[:, None] & (units[None, :] < width)
        z = tl.load(z_ptr + m * zs_m + rows[:, None] * zs_r + units[None, :], mask=inside, other=0.0)
        zf = z.to(tl.float32)
        if HAS_BIAS:  # bias [N, width] added here, in float32, instead of by baddbmm's broadcast copy
            bias = tl.load(bias_ptr + m * width + units, mask=units < width, other=0.0)
            zf = (zf + bias[None, :]).to(z.dtype).to(tl.float32)
        a = tl.where(zf > 0, zf, 0.0)
        a = tl.where(zf != zf, zf, a)  # NaN stays NaN, as torch.relu keeps it
        if HAS_DROPOUT:
            a = a * _pack_factor(keys_ptr, p_ptr, scale_ptr, train_ptr, m, rows, units, in_rows, n_rows,
                                 epoch_ptr, layer, MAX_LAYERS, z.dtype)
        tl.store(out_ptr + (m * n_rows + rows[:, None]) * width + units[None, :], a.to(z.dtype), mask=inside)

    @triton.jit(do_not_specialize=["n_rows", "layer"])
    def _relu_dropout_bwd(out_ptr, grad_ptr, gz_ptr, keys_ptr, p_ptr, scale_ptr, train_ptr,
                          n_rows, width, epoch_ptr, layer, zs_m, zs_r, MAX_LAYERS: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
        m = tl.program_id(1).to(tl.int64)  # int64 offsets: a pack may hold more than 2**31 activations
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        units = tl.arange(0, BLOCK_W)
        in_rows = rows < n_rows
        inside = in_rows[:, None] & (units[None, :] < width)
        offs = (m * n_rows + rows[:, None]) * width + units[None, :]
        a = tl.load(out_ptr + offs, mask=inside, other=0.0)
        g = tl.load(grad_ptr + offs, mask=inside, other=0.0)
        gf = g.to(tl.float32)
        if HAS_DROPOUT:  # the mask again, from the hash: cheaper than storing it
            factor = _pack_factor(keys_ptr, p_ptr, scale_ptr, train_ptr, m, rows, units, in_rows, n_rows,
                                  epoch_ptr, layer, MAX_LAYERS, g.dtype)
            gf = (gf * factor).to(g.dtype).to(tl.float32)
        # torch's threshold_backward on relu's output: 0 where it is <= 0, the gradient elsewhere (NaN too);
        # a dropped unit's output is 0 (or NaN), and its gradient was multiplied by 0 above
        gz = tl.where(a.to(tl.float32) <= 0, 0.0, gf)
        tl.store(gz_ptr + m * zs_m + rows[:, None] * zs_r + units[None, :], gz.to(g.dtype), mask=inside)


def _blocks(width: int) -> tuple[int, int, int]:
    block_w = max(16, triton.next_power_of_2(width))
    block_r = max(1, 4096 // block_w)
    return block_r, block_w, 4


def _int32_bits(value: int) -> int:
    """A 32-bit unsigned value as the int32 with the same bits (Triton types a Python int by its range)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def dropout_mask(lkey: int, rows: torch.Tensor, width: int, p: float) -> torch.Tensor:
    """dropout.dropout_mask on a CUDA device, given the layer key."""
    n = rows.numel()
    out = torch.empty(n, width, dtype=torch.float32, device=rows.device)
    block_r, block_w, warps = _blocks(width)
    p32 = float(torch.tensor(p, dtype=torch.float32))
    _mask_kernel[(triton.cdiv(n, block_r),)](rows.contiguous(), out, n, width, _int32_bits(lkey), p32,
                                            hashing.keep_factor(p), BLOCK_R=block_r, BLOCK_W=block_w,
                                            num_warps=warps)
    return out


class PackDropout:
    """What a fused pack's activation kernel needs per model, made once per pack: fit keys, p and
    1/(1-p) as float32, and the training-row flags as uint8 [N, rows]."""

    def __init__(self, keys: list[int], p: list[float], train_rows: torch.Tensor):
        device = train_rows.device
        self.has_dropout = any(q > 0 for q in p)
        self.keys = torch.tensor(keys, dtype=torch.int64, device=device)
        self.p = torch.tensor(p, dtype=torch.float32, device=device)
        self.scale = torch.tensor([hashing.keep_factor(q) for q in p], dtype=torch.float32, device=device)
        self.train = train_rows.to(torch.uint8).contiguous()


class _ReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, bias: torch.Tensor | None, pack: PackDropout, epoch: torch.Tensor,
                layer: int) -> torch.Tensor:
        n, n_rows, width = z.shape
        if z.stride(2) != 1:
            raise ValueError("relu_dropout needs unit stride 1 along the width")
        if bias is not None and (bias.dtype != torch.float32 or bias.numel() != n * width or not bias.is_contiguous()):
            raise ValueError("relu_dropout's bias must be contiguous float32 with N * width values")
        out = torch.empty(n, n_rows, width, dtype=z.dtype, device=z.device)
        block_r, block_w, warps = _blocks(width)
        grid = (triton.cdiv(n_rows, block_r), n)  # rows on axis 0: CUDA allows 65,535 blocks on axis 1
        _relu_dropout_fwd[grid](z, bias if bias is not None else z, out, pack.keys, pack.p, pack.scale, pack.train,
                                n_rows, width, epoch, layer, z.stride(0), z.stride(1),
                                MAX_LAYERS=hashing.MAX_LAYERS, HAS_BIAS=bias is not None,
                                HAS_DROPOUT=pack.has_dropout, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=warps)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(out)
        ctx.pack, ctx.epoch, ctx.layer = pack, epoch, layer
        ctx.z_layout = (z.shape, z.stride())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        pack, (shape, stride) = ctx.pack, ctx.z_layout
        grad = grad.contiguous()
        n, n_rows, width = shape
        grad_z = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device)
        block_r, block_w, warps = _blocks(width)
        grid = (triton.cdiv(n_rows, block_r), n)  # rows on axis 0: CUDA allows 65,535 blocks on axis 1
        _relu_dropout_bwd[grid](out, grad, grad_z, pack.keys, pack.p, pack.scale, pack.train, n_rows, width,
                                ctx.epoch, ctx.layer, stride[0], stride[1], MAX_LAYERS=hashing.MAX_LAYERS,
                                HAS_DROPOUT=pack.has_dropout,
                                BLOCK_R=block_r, BLOCK_W=block_w, num_warps=warps)
        grad_bias = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[1]:
            grad_bias = grad_z.sum(dim=1, dtype=torch.float32).view(ctx.bias_shape)
        return grad_z, grad_bias, None, None, None


def relu_dropout(z: torch.Tensor, pack: PackDropout, epoch: int | torch.Tensor, layer: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """relu(z + bias) * each model's mask of this epoch and layer, z viewed as [N, rows, width] (unit
    stride 1), bias float32 with N * width values (or None); the result is contiguous [N, rows, width].
    ``epoch``: an int, or an int64 tensor of one element on z's device that the kernels read when they
    run (and again in the backward, so it must not change in between)."""
    hashing.epoch_salt(0, layer)  # checks the layer index
    if not isinstance(epoch, torch.Tensor):
        epoch = torch.tensor([epoch], dtype=torch.int64, device=z.device)
    return _ReluDropout.apply(z, bias, pack, epoch, layer)
