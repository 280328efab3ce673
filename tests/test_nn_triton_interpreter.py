"""pack_kernels.py's Triton kernels under Triton's interpreter, on the CPU (tox -e kernels): TritonPack
trained where CI can run it. The interpreter computes with numpy, not with the GPU's units, so these
tests do not speak for the GPU's bits (tests/gpu does); they catch a kernel that reads padding, another
fit's rows, a wrong row chunk or a wrong layer. float32 and tf32 only: the interpreter has no bf16 of
the GPU's. Small on purpose: the interpreter runs each program in Python."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nn_cases import fit_tasks

from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.pack import TorchPack, TritonPack
from watcher_plugins.nn_batch.training import TrainSettings
from watcher_plugins.records import DataRef

pytestmark = pytest.mark.kernels
CPU = torch.device("cpu")
DATA = DataRef(embedded="survivors", rows=150)
#: Widths that pad each other in every layer, dropout and none, three folds.
SPECS = [(0, 0, [20, 10], 1e-2, 1e-4, 0.2), (1, 1, [40, 24], 3e-3, 0.0, 0.0), (2, 2, [8, 30], 1e-2, 1e-3, 0.1)]


@pytest.fixture(scope="module")
def cache():
    return DeviceDatasetCache(CPU)


def train(pack_cls, tasks, precision):
    settings = TrainSettings(max_epochs=4, patience=6, precision=precision)
    pack = pack_cls(tasks, settings, CPU)
    got = {}
    FusedTrainer(settings, CPU).run_pack(pack, lambda o: got.__setitem__(o.key, o))
    return got, pack


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_fit_gives_the_same_bits_alone_and_in_a_padded_pack(cache, precision):
    tasks = fit_tasks(cache, DATA, SPECS)
    packed, pack = train(TritonPack, tasks, precision)
    assert pack.widths == [40, 30] and pack.n_chunks > 1  # padding in both layers; chunked gradients
    for m, task in enumerate(tasks):
        alone, alone_pack = train(TritonPack, [task], precision)
        assert (alone[task.key].score, alone[task.key].best_epoch) == (packed[task.key].score, packed[task.key].best_epoch)
        assert torch.equal(alone_pack.stopping.best_pred[0], pack.stopping.best_pred[m])


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_triton_pack_computes_what_a_torch_pack_computes(cache, precision):
    tasks = fit_tasks(cache, DATA, SPECS)
    triton_got, _ = train(TritonPack, tasks, precision)
    torch_got, _ = train(TorchPack, tasks, precision)
    assert any(ref.best_epoch > 0 for ref in torch_got.values())  # the steps moved the fits
    for key, ref in torch_got.items():
        assert np.isfinite(ref.score) and ref.epochs == 4
        assert abs(triton_got[key].score - ref.score) < 1e-6, key
        assert triton_got[key].best_epoch == ref.best_epoch


def test_padded_parameters_stay_exactly_zero(cache):
    _, pack = train(TritonPack, fit_tasks(cache, DATA, SPECS), "fp32")
    w1 = pack.params[2]  # [3, 40, 30]: fit 0 is 20 -> 10, fit 2 is 8 -> 30
    assert torch.count_nonzero(w1[0, 20:, :]) == 0 and torch.count_nonzero(w1[0, :, 10:]) == 0
    assert torch.count_nonzero(w1[2, 8:, :]) == 0
    assert torch.count_nonzero(pack.params[0][0, :, 20:]) == 0 and torch.count_nonzero(pack.params[1][2, 8:]) == 0
    assert torch.count_nonzero(pack.params[4][0, 10:]) == 0  # the output layer's weights of fit 0
    assert torch.count_nonzero(w1[1, :, :24]) == 40 * 24  # and the real ones did train


def test_a_fit_that_stopped_is_not_computed_and_its_mates_keep_their_bits(cache):
    # fit 0's learning rate overshoots at once: early stopping ends it at epoch 1, long before the host
    # would see it (every HOST_CHECK_EVERY epochs); it stays in the pack, and must cost nothing there
    specs = [(0, 0, [20, 10], 3.0, 0.0, 0.0), SPECS[1]]
    settings = TrainSettings(max_epochs=5, patience=1, precision="fp32")
    tasks = fit_tasks(cache, DATA, specs)
    pack = TritonPack(tasks, settings, CPU)
    frozen = None
    while pack.epoch < settings.max_epochs:
        pack.run_epoch()
        if frozen is None and bool(pack.stopping.stopped[0]):
            frozen = [p[0].clone() for p in pack.params]
    assert frozen is not None and not bool(pack.stopping.stopped[1])
    assert all(torch.equal(p[0], f) for p, f in zip(pack.params, frozen))  # no step after its stop
    assert [int(r[0]) for r in pack.real] == [pack.data.n_features, 0, 0, 0]
    for m, task in enumerate(tasks):
        alone = TritonPack([task], settings, CPU)
        while alone.epoch < settings.max_epochs:
            alone.run_epoch()
        for name in ("best_epoch", "stop_epoch", "best_loss"):
            assert torch.equal(getattr(alone.stopping, name)[0], getattr(pack.stopping, name)[m]), (m, name)
        assert torch.equal(alone.stopping.best_pred[0], pack.stopping.best_pred[m]), m
