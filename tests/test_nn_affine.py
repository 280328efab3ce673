"""The fused pack's matmuls with row-split weight gradients: the split gradient is the plain product,
the split is planned to fill a GPU only where the tiles do not. CPU, where the split is forced (a CPU never
splits by itself); test_nn_trainers.py trains a pack with split gradients against serial."""

from __future__ import annotations

import pytest
import torch

from watcher_plugins.nn_batch import affine as affine_module
from watcher_plugins.nn_batch.affine import MIN_CHUNK_ROWS, affine, row_splits, weight_grad

CPU = torch.device("cpu")
GPU_NAME_ONLY = torch.device("cuda", 0)  # never touched: row_splits only reads its type


@pytest.mark.parametrize("rows,splits", [(1000, 1), (1000, 8), (1003, 8), (997, 13)])
def test_a_split_weight_gradient_is_the_plain_product(rows, splits):
    generator = torch.Generator().manual_seed(rows + splits)
    a = torch.randn(3, rows, 17, generator=generator)
    b = torch.randn(3, rows, 5, generator=generator)
    expected = torch.bmm(a.double().transpose(1, 2), b.double())
    got = weight_grad(a, b, splits)
    assert got.shape == (3, 17, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_float64_partial_sums_stay_float64():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(2, 999, 7, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 999, 4, generator=generator, dtype=torch.float64)
    got = weight_grad(a, b, 3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.bmm(a.transpose(1, 2), b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False])
def test_affine_gradients_pass_gradcheck_with_split_rows(monkeypatch, batched):
    monkeypatch.setattr(affine_module, "row_splits", lambda *args: 3)
    generator = torch.Generator().manual_seed(5)
    shape_h, shape_w, shape_b = ((2, 11, 4), (2, 4, 3), (2, 1, 3)) if batched else ((11, 4), (4, 3), (1, 3))
    h = torch.randn(*shape_h, generator=generator, dtype=torch.float64, requires_grad=batched)
    w = torch.randn(*shape_w, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(*shape_b, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(affine, (h, w, bias))
    assert torch.autograd.gradcheck(lambda h, w: affine(h, w), (h, w))


def test_splits_fill_the_gpu_only_where_the_tiles_do_not(monkeypatch):
    monkeypatch.setattr(affine_module, "_multiprocessors", lambda device: 132)
    rows = 98_784
    # 10 models of 512 -> 256: 320 tiles of 64x64 already fill 132 multiprocessors twice
    assert row_splits(10, rows, 512, 256, GPU_NAME_ONLY) == 1
    # 5 models of 64 -> 32: 5 tiles; split into chunks that divide the rows and stay GEMM-sized
    splits = row_splits(5, rows, 64, 32, GPU_NAME_ONLY)
    assert 5 * splits >= 2 * 132 and rows % splits == 0 and rows // splits >= MIN_CHUNK_ROWS
    # a divisor below the wanted split is taken too (4,000 rows: 2 chunks of 2,000, no remainder); a
    # prime row count has none: a batch is not split (its chunks would be copies of the activations),
    # a batch of one (layer 0) is, since its chunks are views anyway
    assert row_splits(5, 4000, 64, 32, GPU_NAME_ONLY) == 2
    assert row_splits(5, 100_003, 64, 32, GPU_NAME_ONLY) == 1
    assert row_splits(1, 100_003, 62, 320, GPU_NAME_ONLY) > 1
    # too few rows to cut: no split; a CPU never splits
    assert row_splits(5, MIN_CHUNK_ROWS + 5, 64, 32, GPU_NAME_ONLY) == 1
    assert row_splits(5, rows, 64, 32, CPU) == 1
    monkeypatch.setattr(affine_module, "BLOCKS_PER_SM", 0)
    assert row_splits(5, rows, 64, 32, GPU_NAME_ONLY) == 1
