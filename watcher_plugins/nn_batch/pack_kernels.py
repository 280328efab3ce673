"""The batch-invariant Triton kernels of a fit pack on a CUDA device (pack.py's TritonPack).

Every number a fit computes comes from one program of one of these kernels, and that program reads
only the fit's own tensors, loops over the fit's own real widths and rows in a fixed order, and runs
with tiles fixed per precision (``TILES``): nothing is chosen from the pack's shape, so a fit gets the
same bits alone, beside any other fits, padded into a wider pack, on any stream and on any GPU of one
model. The pieces that make that hold:

- No reduction ever spans two fits, and none is split by the pack's size: the forward and the input
  gradient reduce over the fit's own input (output) units, ``range(0, real, BLOCK)``; padded units are
  never read, so padding adds nothing at all, not even zeros.
- Weight gradients reduce over the dataset's rows (~10^5) in ``row_chunks(n_rows)`` chunks, a number
  chosen from the row count alone; each chunk's partial sum is one program's, and the partials are
  added in chunk order by the Adam kernel that consumes them. No atomics anywhere.
- The held-out loss is one program per fit, in row order.
- Adam is elementwise, its per-fit learning rate and weight decay read from per-fit tensors.

Dropout masks are made in registers from dropout.py's hash of (fit, epoch, layer, row, unit), as the
torch reference (dropout.draws) makes them. The epoch and the Adam step are read from device memory,
so that a captured epoch (CUDA graph) replays with the right ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from watcher_plugins.nn_batch import dropout as hashing

try:  # Triton ships with CUDA builds of torch; CPU hosts use the torch implementation (pack.TorchPack)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


@dataclass(frozen=True)
class Tiles:
    """One precision's tiles, the same for every shape (batch invariance rests on it)."""

    rows: int  # dataset rows a program covers (the forward's M; the weight gradient's K step)
    units: int  # output units a program covers (the forward's N)
    inner: int  # input units a step of the forward's K loop covers
    warps: int
    stages: int
    dot: str  # tl.dot's input_precision for float32 operands (bf16 operands ignore it)


TILES = {
    "fp32": Tiles(rows=64, units=64, inner=16, warps=4, stages=2, dot="ieee"),
    "tf32": Tiles(rows=64, units=64, inner=32, warps=4, stages=3, dot="tf32"),
    "bf16": Tiles(rows=64, units=64, inner=32, warps=4, stages=3, dot="ieee"),
}
#: Tiles of the output layer's one unit (its products, its weight gradient, the gradient it passes down),
#: which would waste a 64-wide tile; 16 is tl.dot's narrowest.
OUTPUT_UNITS = 16
#: Rows a step of a weight gradient's loop covers (the K step of a^T @ g).
GRAD_ROWS = 32
#: Rows a program of the held-out loss or the element-wise kernels covers at once.
ROW_BLOCK = 1024
#: A weight gradient is cut into at most this many row chunks (fewer on small data).
MAX_ROW_CHUNKS = 16


def row_chunks(n_rows: int) -> tuple[int, int]:
    """(chunk rows, chunks) of a weight gradient over ``n_rows`` rows: a function of the row count
    alone, so that a fit's gradient sums its rows in the same order whatever pack it is in. Chunks are
    whole GRAD_ROWS steps; up to MAX_ROW_CHUNKS of them give small packs enough programs to fill the GPU."""
    steps = math.ceil(n_rows / GRAD_ROWS)
    chunk = math.ceil(steps / MAX_ROW_CHUNKS) * GRAD_ROWS
    return chunk, math.ceil(n_rows / chunk)


def available() -> bool:
    """Triton imports and a CUDA device is there; whether the kernels build and train is pack.triton_trains'
    probe (a host without a C compiler, say, cannot build Triton's launcher)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _fmix32(h):
        h ^= h >> 16
        h = h * tl.full((), 0x85EBCA6B, tl.uint32)
        h ^= h >> 13
        h = h * tl.full((), 0xC2B2AE35, tl.uint32)
        return h ^ (h >> 16)

    @triton.jit
    def _keep_factor(keys_ptr, p_ptr, scale_ptr, train_ptr, m, rows, units, in_rows, n_rows, epoch_ptr, layer,
                     MAX_LAYERS: tl.constexpr):
        """Model m's dropout factor [R, W] in float32: 1/(1-p) on kept units of its training rows, 0 on
        dropped ones, 1 on its held-out rows (dropout.py's hash, with the epoch read from the device)."""
        # dropout.epoch_salt: (epoch * MAX_LAYERS + layer) modulo 2**32
        counter = tl.load(epoch_ptr).to(tl.uint32) * MAX_LAYERS + layer.to(tl.uint32)
        lkey = _fmix32(tl.load(keys_ptr + m).to(tl.uint32) ^ _fmix32(counter))
        row_hash = _fmix32(lkey ^ rows.to(tl.uint32))
        h = _fmix32(row_hash[:, None] + units.to(tl.uint32)[None, :])
        u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
        train = tl.load(train_ptr + m * n_rows + rows, mask=in_rows, other=0)
        factor = tl.where(u >= tl.load(p_ptr + m), tl.load(scale_ptr + m), 0.0)
        return tl.where(train[:, None] != 0, factor, 1.0)

    @triton.jit
    def _operand(x, BF16: tl.constexpr):
        """A matmul operand in the precision's operand type (bf16 rounds; fp32 and tf32 stay float32)."""
        if BF16:
            y = x.to(tl.bfloat16)
        else:
            y = x.to(tl.float32)
        return y

    @triton.jit
    def _tile(tiles_c):
        """(row tile, column tile) of this program: the column tiles of one row tile are neighbours in
        the grid's x axis, so that they run together and read that row tile's inputs through the L2 cache
        once, not once per column tile from memory (the x axis also takes more than 65,535 row tiles)."""
        pid = tl.program_id(0).to(tl.int64)
        return pid // tiles_c, pid % tiles_c

    @triton.jit
    def _rows_times_weights(a_ptr, a_sr, rows, in_rows, b_ptr, b_sk, b_sc, cols, in_cols, k_real,
                            BF16: tl.constexpr, DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        """One fit's [BLOCK_R, BLOCK_C] tile of a[rows] @ b[:, cols], its K loop over the fit's own
        k_real inputs in BLOCK_K steps (a: unit stride along K; b: element (k, c) at k * b_sk + c * b_sc)."""
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, k_real, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            in_k = ks < k_real
            a = tl.load(a_ptr + rows[:, None] * a_sr + ks[None, :], mask=in_rows[:, None] & in_k[None, :], other=0.0)
            b = tl.load(b_ptr + ks[:, None] * b_sk + cols[None, :] * b_sc, mask=in_k[:, None] & in_cols[None, :],
                        other=0.0)
            acc = tl.dot(_operand(a, BF16), _operand(b, BF16), acc, input_precision=DOT)
        return acc

    @triton.jit(do_not_specialize=["n_rows", "layer"])
    def _hidden_forward(a_ptr, a_sm, a_sr, w_ptr, w_sm, w_sk, b_ptr, b_sm, out_ptr, o_sm, o_sr,
                        k_real_ptr, j_real_ptr, n_rows, tiles_j,
                        keys_ptr, p_ptr, scale_ptr, train_ptr, epoch_ptr, layer,
                        MAX_LAYERS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BF16: tl.constexpr,
                        DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m] = dropout(relu(a[m] @ w[m] + b[m])) for one hidden layer; a_sm = 0: a is the shared X."""
        m = tl.program_id(1).to(tl.int64)  # int64 offsets: a pack may hold more than 2**31 activations
        row_tile, col_tile = _tile(tiles_j)
        j_real = tl.load(j_real_ptr + m)
        if col_tile * BLOCK_J < j_real:
            k_real = tl.load(k_real_ptr + m)
            rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = col_tile * BLOCK_J + tl.arange(0, BLOCK_J)
            in_rows = rows < n_rows
            in_cols = cols < j_real
            acc = _rows_times_weights(a_ptr + m * a_sm, a_sr, rows, in_rows, w_ptr + m * w_sm, w_sk, 1, cols,
                                      in_cols, k_real, BF16, DOT, BLOCK_R, BLOCK_J, BLOCK_K)
            z = acc + tl.load(b_ptr + m * b_sm + cols, mask=in_cols, other=0.0)[None, :]
            h = tl.where(z > 0, z, 0.0)
            h = tl.where(z != z, z, h)  # NaN stays NaN, as torch.relu keeps it: a diverged fit must show
            if HAS_DROPOUT:
                h = h * _keep_factor(keys_ptr, p_ptr, scale_ptr, train_ptr, m, rows, cols, in_rows, n_rows,
                                     epoch_ptr, layer, MAX_LAYERS)
            tl.store(out_ptr + m * o_sm + rows[:, None] * o_sr + cols[None, :], h.to(out_ptr.dtype.element_ty),
                     mask=in_rows[:, None] & in_cols[None, :])

    @triton.jit(do_not_specialize=["n_rows"])
    def _output_forward(a_ptr, a_sm, a_sr, w_ptr, w_sm, b_ptr, k_real_ptr, y_ptr, train_ptr, loss_scale_ptr,
                        pred_ptr, grad_ptr, n_rows, BF16: tl.constexpr, DOT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
        """pred[m] = a[m] @ w[m] + b[m] (one output unit, float32) and the loss gradient on it:
        (pred - y) * loss_scale[m] on the fit's training rows, 0 on its held-out rows. The product is a
        tl.dot against a BLOCK_O-wide tile whose other columns are zero (a tl.sum's order would follow
        the compiler's choice of layout, which follows the pack's padded strides)."""
        m = tl.program_id(1).to(tl.int64)
        k_real = tl.load(k_real_ptr + m)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_O)
        in_rows = rows < n_rows
        acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
        for k0 in range(0, k_real, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            in_k = ks < k_real
            a = tl.load(a_ptr + m * a_sm + rows[:, None] * a_sr + ks[None, :],
                        mask=in_rows[:, None] & in_k[None, :], other=0.0)
            w = tl.load(w_ptr + m * w_sm + ks[:, None] + 0 * cols[None, :],
                        mask=in_k[:, None] & (cols == 0)[None, :], other=0.0)
            acc = tl.dot(_operand(a, BF16), _operand(w, BF16), acc, input_precision=DOT)
        # column 0 holds the product, the others exact zeros: the sum adds nothing to it, in any order
        pred = tl.sum(acc, axis=1) + tl.load(b_ptr + m)
        y = tl.load(y_ptr + rows, mask=in_rows, other=0.0)
        train = tl.load(train_ptr + m * n_rows + rows, mask=in_rows, other=0)
        grad = tl.where(train != 0, (pred - y) * tl.load(loss_scale_ptr + m), 0.0)
        tl.store(pred_ptr + m * n_rows + rows, pred, mask=in_rows)
        tl.store(grad_ptr + m * n_rows + rows, grad.to(grad_ptr.dtype.element_ty), mask=in_rows)

    @triton.jit(do_not_specialize=["n_rows"])
    def _held_out_loss(pred_ptr, y_ptr, train_ptr, val_scale_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
        """out[m] = mean squared error of pred[m] on the fit's held-out rows, summed in row order."""
        m = tl.program_id(0).to(tl.int64)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            in_rows = rows < n_rows
            d = tl.load(pred_ptr + m * n_rows + rows, mask=in_rows, other=0.0) - tl.load(y_ptr + rows, mask=in_rows,
                                                                                      other=0.0)
            train = tl.load(train_ptr + m * n_rows + rows, mask=in_rows, other=1)
            acc += tl.where(train == 0, d * d, 0.0)
        tl.store(out_ptr + m, tl.sum(acc, axis=0) * tl.load(val_scale_ptr + m))

    @triton.jit(do_not_specialize=["n_rows", "layer"])
    def _input_grad(g_ptr, g_sm, g_sr, w_ptr, w_sm, w_sk, a_ptr, a_sm, a_sr, out_ptr, o_sm, o_sr,
                    k_real_ptr, j_real_ptr, n_rows, tiles_c,
                    keys_ptr, p_ptr, scale_ptr, train_ptr, epoch_ptr, layer,
                    MAX_LAYERS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BF16: tl.constexpr,
                    DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
        """The gradient at the pre-activation of the layer below: out[m] = (g[m] @ w[m]^T) * the layer
        below's dropout factor, 0 where its ReLU output a[m] is <= 0 (torch's threshold_backward)."""
        m = tl.program_id(1).to(tl.int64)
        row_tile, col_tile = _tile(tiles_c)
        k_real = tl.load(k_real_ptr + m)  # this layer's inputs: the output units of the layer below
        if col_tile * BLOCK_C < k_real:
            j_real = tl.load(j_real_ptr + m)
            rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
            in_rows = rows < n_rows
            in_cols = cols < k_real
            # g[m] @ w[m]^T: the K loop runs over this layer's outputs, w's element (j, c) at c * w_sk + j
            acc = _rows_times_weights(g_ptr + m * g_sm, g_sr, rows, in_rows, w_ptr + m * w_sm, 1, w_sk, cols,
                                      in_cols, j_real, BF16, DOT, BLOCK_R, BLOCK_C, BLOCK_J)
            inside = in_rows[:, None] & in_cols[None, :]
            a = tl.load(a_ptr + m * a_sm + rows[:, None] * a_sr + cols[None, :], mask=inside, other=0.0)
            if HAS_DROPOUT:
                acc = acc * _keep_factor(keys_ptr, p_ptr, scale_ptr, train_ptr, m, rows, cols, in_rows, n_rows,
                                         epoch_ptr, layer, MAX_LAYERS)
            gz = tl.where(a.to(tl.float32) <= 0, 0.0, acc)
            tl.store(out_ptr + m * o_sm + rows[:, None] * o_sr + cols[None, :], gz.to(out_ptr.dtype.element_ty),
                     mask=inside)

    @triton.jit(do_not_specialize=["n_rows"])
    def _weight_grad_chunks(a_ptr, a_sm, a_sr, g_ptr, g_sm, g_sr, part_ptr, p_sm, p_ss, p_si,
                            bpart_ptr, bp_sm, bp_ss, i_real_ptr, j_real_ptr, n_rows, chunk_rows, tiles_j,
                            BF16: tl.constexpr, DOT: tl.constexpr, BLOCK_I: tl.constexpr,
                            BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
        """One row chunk's share of a layer's weight and bias gradients: part[m, s] = a[m, chunk]^T @
        g[m, chunk], bpart[m, s] = the column sums of g[m, chunk] (written by the first row of tiles).
        The column sums are a tl.dot with ones too: a tl.sum's order would follow the compiler's choice
        of layout, which follows the pack's padded strides."""
        ti = tl.program_id(0) // tiles_j
        tj = tl.program_id(0) % tiles_j
        s = tl.program_id(1).to(tl.int64)
        m = tl.program_id(2).to(tl.int64)
        i_real = tl.load(i_real_ptr + m)
        j_real = tl.load(j_real_ptr + m)
        if (ti * BLOCK_I < i_real) & (tj * BLOCK_J < j_real):
            icols = ti * BLOCK_I + tl.arange(0, BLOCK_I)
            jcols = tj * BLOCK_J + tl.arange(0, BLOCK_J)
            in_i = icols < i_real
            in_j = jcols < j_real
            start = s * chunk_rows
            end = tl.minimum(start + chunk_rows, n_rows)
            acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
            bacc = tl.zeros((16, BLOCK_J), dtype=tl.float32)
            ones = tl.full((16, BLOCK_R), 1.0, dtype=tl.float32)
            for r0 in range(start, end, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                in_rows = rows < end
                a_t = tl.load(a_ptr + m * a_sm + rows[None, :] * a_sr + icols[:, None],
                              mask=in_i[:, None] & in_rows[None, :], other=0.0)
                g = tl.load(g_ptr + m * g_sm + rows[:, None] * g_sr + jcols[None, :],
                            mask=in_rows[:, None] & in_j[None, :], other=0.0)
                g = _operand(g, BF16)
                acc = tl.dot(_operand(a_t, BF16), g, acc, input_precision=DOT)
                if ti == 0:  # the column sums are the first row of tiles' to store: the others skip them
                    bacc = tl.dot(_operand(ones, BF16), g, bacc, input_precision="ieee")
            tl.store(part_ptr + m * p_sm + s * p_ss + icols[:, None] * p_si + jcols[None, :], acc,
                     mask=in_i[:, None] & in_j[None, :])
            if ti == 0:  # every row of bacc holds the column sums: store the first
                brow = tl.arange(0, 16)
                tl.store(bpart_ptr + m * bp_sm + s * bp_ss + jcols[None, :] + 0 * brow[:, None], bacc,
                         mask=(brow == 0)[:, None] & in_j[None, :])

    @triton.jit
    def _adam(w_ptr, m1_ptr, m2_ptr, part_ptr, p_sm, p_ss, n_chunks, w_sm, w_si, i_real_ptr, j_real_ptr,
              lr_ptr, wd_ptr, step_ptr, bc1_ptr, bc2_sqrt_ptr, tiles_j, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
              BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """One Adam step (L2 weight decay added to the gradient, as torch.optim.Adam) of model m's real
        entries of one stacked parameter; its gradient is the sum of the row chunks' partials, in chunk
        order. Padded entries are never touched: they stay zero."""
        ti = tl.program_id(0) // tiles_j
        tj = tl.program_id(0) % tiles_j
        m = tl.program_id(1).to(tl.int64)
        i_real = tl.load(i_real_ptr + m)
        j_real = tl.load(j_real_ptr + m)
        if (ti * BLOCK_I < i_real) & (tj * BLOCK_J < j_real):
            icols = ti * BLOCK_I + tl.arange(0, BLOCK_I)
            jcols = tj * BLOCK_J + tl.arange(0, BLOCK_J)
            inside = (icols < i_real)[:, None] & (jcols < j_real)[None, :]
            grad = tl.load(part_ptr + m * p_sm + icols[:, None] * w_si + jcols[None, :], mask=inside, other=0.0)
            for s in range(1, n_chunks):
                grad += tl.load(part_ptr + m * p_sm + s * p_ss + icols[:, None] * w_si + jcols[None, :],
                                mask=inside, other=0.0)
            offs = m * w_sm + icols[:, None] * w_si + jcols[None, :]
            w = tl.load(w_ptr + offs, mask=inside, other=0.0)
            m1 = tl.load(m1_ptr + offs, mask=inside, other=0.0)
            m2 = tl.load(m2_ptr + offs, mask=inside, other=0.0)
            step = tl.load(step_ptr)
            # the step size in float64 first, as torch.optim.Adam's Python-float lr / bias_correction1
            step_size = (tl.load(lr_ptr + m) / tl.load(bc1_ptr + step)).to(tl.float32)
            g = grad + w * tl.load(wd_ptr + m)
            m1 = m1 + (g - m1) * one_minus_beta1
            m2 = m2 * beta2 + (g * g) * one_minus_beta2
            denom = tl.div_rn(tl.sqrt_rn(m2), tl.load(bc2_sqrt_ptr + step)) + eps
            w = w - tl.div_rn(m1, denom) * step_size
            tl.store(w_ptr + offs, w, mask=inside)
            tl.store(m1_ptr + offs, m1, mask=inside)
            tl.store(m2_ptr + offs, m2, mask=inside)


def _stride_m(t: torch.Tensor) -> int:
    """A stacked tensor's model stride; 0 for the shared input X (2-D)."""
    return 0 if t.dim() == 2 else t.stride(0)


def hidden_forward(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor, k_real: torch.Tensor,
                   j_real: torch.Tensor, dropout: PackDropout, epoch: torch.Tensor, layer: int, tiles: Tiles) -> None:
    """out [N, R, J] = dropout(relu(a @ w + b)); a is X [R, K] (shared) or [N, R, K]; w [N, K, J]; b [N, J]."""
    n, n_rows, width = out.shape
    tiles_j = triton.cdiv(width, tiles.units)
    grid = (triton.cdiv(n_rows, tiles.rows) * tiles_j, n)
    _hidden_forward[grid](a, _stride_m(a), a.stride(-2), w, w.stride(0), w.stride(1), b, b.stride(0),
                          out, out.stride(0), out.stride(1), k_real, j_real, n_rows, tiles_j,
                          dropout.keys, dropout.p, dropout.scale, dropout.train, epoch, layer,
                          MAX_LAYERS=hashing.MAX_LAYERS, HAS_DROPOUT=dropout.has_dropout,
                          BF16=out.dtype == torch.bfloat16, DOT=tiles.dot, BLOCK_R=tiles.rows,
                          BLOCK_J=tiles.units, BLOCK_K=tiles.inner, num_warps=tiles.warps, num_stages=tiles.stages)


def output_forward(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k_real: torch.Tensor, y: torch.Tensor,
                   train: torch.Tensor, loss_scale: torch.Tensor, pred: torch.Tensor, grad: torch.Tensor,
                   tiles: Tiles) -> None:
    """pred [N, R] (float32) = a @ w + b with w [N, K, 1], b [N, 1]; grad [N, R] its loss gradient."""
    n, n_rows = pred.shape
    _output_forward[(triton.cdiv(n_rows, tiles.rows), n)](
        a, _stride_m(a), a.stride(-2), w, w.stride(0), b, k_real, y, train, loss_scale, pred, grad, n_rows,
        BF16=grad.dtype == torch.bfloat16, DOT=tiles.dot, BLOCK_R=tiles.rows, BLOCK_K=tiles.inner,
        BLOCK_O=OUTPUT_UNITS, num_warps=tiles.warps)


def held_out_loss(pred: torch.Tensor, y: torch.Tensor, train: torch.Tensor, val_scale: torch.Tensor,
                  out: torch.Tensor) -> None:
    n, n_rows = pred.shape
    _held_out_loss[(n,)](pred, y, train, val_scale, out, n_rows, BLOCK=ROW_BLOCK)


def input_grad(g: torch.Tensor, w: torch.Tensor, a: torch.Tensor, out: torch.Tensor, k_real: torch.Tensor,
               j_real: torch.Tensor, dropout: PackDropout, epoch: torch.Tensor, layer: int, tiles: Tiles,
               output_layer: bool) -> None:
    """out [N, R, K] = relu'(a) * dropout(g @ w^T) with g [N, R, J], w [N, K, J], a [N, R, K] the layer
    below's output; ``layer`` is the layer below's index (its dropout masks). The output layer's one
    unit takes a narrower K step: a tile chosen by the layer's role, never by a pack's widths."""
    n, n_rows, width = out.shape
    tiles_c = triton.cdiv(width, tiles.units)
    grid = (triton.cdiv(n_rows, tiles.rows) * tiles_c, n)
    _input_grad[grid](g, g.stride(0), g.stride(1), w, w.stride(0), w.stride(1), a, a.stride(0), a.stride(1),
                      out, out.stride(0), out.stride(1), k_real, j_real, n_rows, tiles_c,
                      dropout.keys, dropout.p, dropout.scale, dropout.train, epoch, layer,
                      MAX_LAYERS=hashing.MAX_LAYERS, HAS_DROPOUT=dropout.has_dropout,
                      BF16=out.dtype == torch.bfloat16, DOT=tiles.dot, BLOCK_R=tiles.rows, BLOCK_C=tiles.units,
                      BLOCK_J=OUTPUT_UNITS if output_layer else tiles.inner, num_warps=tiles.warps,
                      num_stages=tiles.stages)


def weight_grad_chunks(a: torch.Tensor, g: torch.Tensor, part: torch.Tensor, bpart: torch.Tensor,
                       i_real: torch.Tensor, j_real: torch.Tensor, chunk_rows: int, tiles: Tiles,
                       output_layer: bool) -> None:
    """part [N, S, I, J] and bpart [N, S, J]: each row chunk's a^T @ g and column sums of g, with a X
    [R, I] (shared) or [N, R, I] and g [N, R, J]."""
    n, n_chunks, n_in, n_out = part.shape
    units = OUTPUT_UNITS if output_layer else tiles.units
    tiles_j = triton.cdiv(n_out, units)
    grid = (triton.cdiv(n_in, tiles.units) * tiles_j, n_chunks, n)
    _weight_grad_chunks[grid](a, _stride_m(a), a.stride(-2), g, g.stride(0), g.stride(1),
                              part, part.stride(0), part.stride(1), part.stride(2), bpart, bpart.stride(0),
                              bpart.stride(1), i_real, j_real, a.shape[-2], chunk_rows, tiles_j,
                              BF16=g.dtype == torch.bfloat16, DOT=tiles.dot, BLOCK_I=tiles.units, BLOCK_J=units,
                              BLOCK_R=GRAD_ROWS, num_warps=tiles.warps, num_stages=tiles.stages)


def adam(w: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, part: torch.Tensor, i_real: torch.Tensor,
         j_real: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor, step: torch.Tensor, bc1: torch.Tensor,
         bc2_sqrt: torch.Tensor, betas: tuple[float, float], eps: float) -> None:
    """Adam on w [N, I, J] (or [N, J], a bias) from its gradient's row-chunk partials [N, S, I, J]."""
    w3 = w if w.dim() == 3 else w.unsqueeze(1)
    p4 = part if part.dim() == 4 else part.unsqueeze(2)
    n, n_in, n_out = w3.shape
    block_i, block_j = (1, 256) if n_in == 1 else (32, 64)
    tiles_j = triton.cdiv(n_out, block_j)
    _adam[(triton.cdiv(n_in, block_i) * tiles_j, n)](
        w3, m1, m2, p4, p4.stride(0), p4.stride(1), p4.shape[1], w3.stride(0), w3.stride(1), i_real, j_real,
        lr, wd, step, bc1, bc2_sqrt, tiles_j, betas[0], 1 - betas[0], betas[1], 1 - betas[1], eps,
        BLOCK_I=block_i, BLOCK_J=block_j)


class PackDropout:
    """What a pack's kernels need to make each fit's dropout masks, made once per pack: fit keys, p and
    1/(1-p) as float32, and the training-row flags as uint8 [N, rows]."""

    def __init__(self, keys: list[int], p: list[float], train_rows: torch.Tensor):
        device = train_rows.device
        self.has_dropout = any(q > 0 for q in p)
        self.keys = torch.tensor(keys, dtype=torch.int64, device=device)
        self.p = torch.tensor(p, dtype=torch.float32, device=device)
        self.scale = torch.tensor([hashing.keep_factor(q) for q in p], dtype=torch.float32, device=device)
        self.train = train_rows.to(torch.uint8).contiguous()
