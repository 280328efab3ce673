"""A fit's numbers do not depend on what trains beside it (pack.py): each fit of the issue's mixed
batch gives the same bits (a) alone, (b) beside 1, 7 and 31 other fits, (c) padded into a wider pack,
(d) through serial, streams and fused, (e) with n_concurrent_nn 1, 3, 8 and auto. Floats are compared
for equality, never within a tolerance. The pack mates are drawn afresh on every run (the seed is in
the failure message).

These tests run on the CPU here; tests/gpu/test_nn_gpu_invariance.py runs them again on a CUDA GPU,
where packs are TritonPacks, and adds (f): GPU 0 and GPU 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nn_cases import DATA, MIXED, SETTINGS, fit_tasks

from watcher_plugins.nn_batch.batch import BatchRunner
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.pack import new_pack
from watcher_plugins.nn_batch.protocol import BatchSettings, FitJob
from watcher_plugins.nn_batch.serial import SerialTrainer
from watcher_plugins.nn_batch.streams import StreamsTrainer
from watcher_plugins.nn_batch.training import TrainSettings, precision_context
from watcher_plugins.records import STATUS_OK


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cpu")


@pytest.fixture(scope="module")
def cache(device):
    return DeviceDatasetCache(device)


def settings_for(precision: str) -> TrainSettings:
    return TrainSettings(SETTINGS.max_epochs, SETTINGS.patience, precision)


def bits(outcome) -> tuple:
    """What a fit's outcome is made of, compared exactly: status, R² (a float64 of its best epoch's
    predictions), best epoch and epochs run."""
    return outcome.status, outcome.score, outcome.best_epoch, outcome.epochs


def train_pack(tasks, settings, device) -> dict:
    """Each fit's outcome when these fits train as one pack."""
    got = {}
    trainer = FusedTrainer(settings, device)
    with precision_context(settings.precision, device):
        trainer.run_pack(new_pack(tasks, settings, device), lambda o: got.__setitem__(o.key, bits(o)))
    return got


def random_mates(rng, depth: int, count: int, first_trial: int) -> list[tuple]:
    """``count`` fits of ``depth`` hidden layers with random widths (some wider than any of the batch's,
    so that packs pad), learning rates, weight decay, dropout and folds."""
    mates = []
    for i in range(count):
        widths = [int(w) for w in rng.integers(8, 160, size=depth)]
        mates.append((first_trial + i, int(rng.integers(0, 3)), widths, float(10 ** rng.uniform(-3.5, -1.5)),
                      float(rng.choice([0.0, 1e-5, 1e-3])), float(rng.choice([0.0, 0.1, 0.3]))))
    return mates


@pytest.fixture(scope="module")
def alone(cache, device):
    """Each fit of the mixed batch trained in a pack of its own, by precision."""
    return {precision: {key: value for task in fit_tasks(cache, DATA, MIXED)
                        for key, value in train_pack([task], settings_for(precision), device).items()}
            for precision in ("fp32", "bf16")}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_fit_alone_is_a_real_fit(alone, precision):
    # the guard of the tests below: equal bits of fits that failed, or never left epoch 0, would prove nothing
    for key, (status, r2, best_epoch, epochs) in alone[precision].items():
        assert status == STATUS_OK and np.isfinite(r2) and best_epoch > 0 and epochs > best_epoch, key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("n_mates", [1, 7, 31])
def test_a_fit_gives_its_own_bits_beside_other_fits_in_a_padded_pack(cache, device, alone, precision, n_mates):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    settings = settings_for(precision)
    targets = fit_tasks(cache, DATA, MIXED)
    if n_mates > 7:  # beside 31 others: one fit of each depth (2, 3, 4 layers), dropout and none
        targets = [targets[i] for i in (2, 4, 5)]
    for target in targets:
        depth = len(target.job.hidden_layers)
        mates = fit_tasks(cache, DATA, random_mates(rng, depth, n_mates, first_trial=100))
        # a mate wider than the target in every layer: the target is padded in each
        mates[0] = fit_tasks(cache, DATA, [(99, 1, [w + 24 for w in target.job.hidden_layers], 1e-2, 0.0, 0.2)])[0]
        tasks = list(mates)
        tasks.insert(int(rng.integers(0, len(tasks) + 1)), target)
        got = train_pack(tasks, settings, device)
        assert got[target.key] == alone[precision][target.key], (seed, target.key, n_mates)


def test_padding_alone_changes_nothing(cache, device, alone):
    # the same fit twice: alone, and in a pack whose other fit is far wider
    target = fit_tasks(cache, DATA, MIXED[4:5])[0]
    wide = fit_tasks(cache, DATA, [(50, 0, [600, 500], 1e-3, 0.0, 0.0)])[0]
    got = train_pack([wide, target], settings_for("fp32"), device)
    assert got[target.key] == alone["fp32"][target.key]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_serial_streams_and_fused_give_the_same_bits(cache, device, alone, precision):
    settings = settings_for(precision)
    for trainer in (SerialTrainer(settings, device), StreamsTrainer(settings, device), FusedTrainer(settings, device)):
        got = {}
        with precision_context(precision, device):
            trainer.train(fit_tasks(cache, DATA, MIXED), 8, lambda o, got=got: got.__setitem__(o.key, bits(o)))
        assert got == alone[precision], trainer.name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_n_concurrent_nn_changes_no_bit(device, alone, precision):
    """Through the worker's batch runner, as the executor's batches arrive: strategy auto, n_concurrent
    1 (serial), 3, 8 and auto (fused packs sized by the memory budget)."""
    jobs = [FitJob(trial, fold, 3, 11, tuple(hidden), lr, wd, p, DATA) for trial, fold, hidden, lr, wd, p in MIXED]
    for n_concurrent in (1, 3, 8, "auto"):
        got = {}
        batch = BatchSettings(n_concurrent=n_concurrent, strategy="auto", precision=precision,
                              max_epochs=SETTINGS.max_epochs, patience=SETTINGS.patience, vram_budget_fraction=0.85)
        summary = BatchRunner(device).run(jobs, batch, lambda o, got=got: got.__setitem__(o.key, bits(o)))
        assert summary["strategy"] == ("serial" if n_concurrent == 1 else "fused")
        assert got == alone[precision], n_concurrent
