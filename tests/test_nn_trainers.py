"""The fit semantics and the trainers: a pack computes what a plain nn.Sequential + torch.optim.Adam
computes (within the rounding floor that reordering the plain reference's sums measures, and without
bias over seeds); early-stopped fits leave the pack; the plans; dropout masks; the target's units.
Exact bit-equality across packs and trainers is test_nn_invariance.py's. CPU, fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nn_cases import DATA, MIXED, SETTINGS, fit_tasks, outcomes, plain_fit

from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.pack import TorchFit
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.nn_batch.serial import SerialTrainer
from watcher_plugins.nn_batch.streams import bucket_by_architecture
from watcher_plugins.nn_batch.training import FitTask, TrainSettings
from watcher_plugins.records import STATUS_OK, DataRef

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def device():
    return CPU


@pytest.fixture(scope="module")
def cache(device):
    return DeviceDatasetCache(device)


def test_packs_compute_what_a_plain_sequential_and_adam_computes(cache, device):
    """Each fit of the mixed batch: within 1e-4 of the plain reference, with its best epoch; and the
    guard that makes 1e-4 a measure here: rounding alone (the plain reference with its training rows
    in another order) moves it far less."""
    got = outcomes(FusedTrainer(SETTINGS, device), fit_tasks(cache, DATA, MIXED), 8)
    for task in fit_tasks(cache, DATA, MIXED):
        r2, best_epoch = plain_fit(task, SETTINGS)
        reordered, _ = plain_fit(task, SETTINGS, row_order_seed=1)
        assert abs(reordered - r2) < 1e-4 / 4, task.key
        assert got[task.key].status == STATUS_OK
        assert abs(got[task.key].score - r2) < 1e-4, (task.key, got[task.key].score, r2)
        assert got[task.key].best_epoch == best_epoch, task.key


def test_packs_are_as_close_to_the_plain_reference_as_it_is_to_itself_over_seeds(cache, device):
    """Over three seeds (24 fits): the packs' distance to the plain reference is the size of the plain
    reference's distance to itself with reordered sums (medians within 4x), and has no sign of its own
    (neither sign in more than three quarters of the fits): the one computation is not biased."""
    to_plain, floor, signs = [], [], []
    for seed in (11, 12, 13):
        tasks = fit_tasks(cache, DATA, MIXED, seed=seed)
        got = outcomes(SerialTrainer(SETTINGS, device), tasks, 1)
        for task in tasks:
            r2, _ = plain_fit(task, SETTINGS)
            to_plain.append(abs(got[task.key].score - r2))
            signs.append(np.sign(got[task.key].score - r2))
            floor.append(abs(plain_fit(task, SETTINGS, row_order_seed=seed)[0] - r2))
    assert max(to_plain) < 1e-4
    assert np.median(to_plain) <= 4 * np.median(floor), (np.median(to_plain), np.median(floor))
    assert abs(sum(signs)) <= len(signs) / 2, signs


@pytest.mark.parametrize("hidden,lr,wd", [([256, 128, 64], 3e-3, 1e-4), ([128, 64], 1e-2, 0.0)])
def test_a_longer_fit_stays_with_the_plain_reference(cache, device, hidden, lr, wd):
    settings = TrainSettings(max_epochs=60, patience=5)
    task = fit_tasks(cache, DATA, [(0, 1, hidden, lr, wd, 0.0)])
    got = outcomes(SerialTrainer(settings, device), task, 1)[(0, 1)]
    r2, best_epoch = plain_fit(task[0], settings)
    assert got.best_epoch == best_epoch
    assert abs(got.score - r2) < 1e-6


def test_early_stopped_fits_leave_the_pack_and_it_is_compacted(cache, device):
    settings = TrainSettings(max_epochs=80, patience=3)
    specs = [(t, t % 3, [128, 64] if t % 2 else [32, 16], lr, 0.0, 0.0)
             for t, lr in enumerate([3e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 3e-4, 1e-4])]
    fused = FusedTrainer(settings, device)
    got = outcomes(fused, fit_tasks(cache, DATA, specs), 8)
    ref = outcomes(SerialTrainer(settings, device), fit_tasks(cache, DATA, specs), 1)
    assert fused.compactions >= 1
    assert len({o.epochs for o in got.values()}) > 1  # fits really stopped at different epochs
    for key in ref:
        assert (got[key].score, got[key].epochs) == (ref[key].score, ref[key].epochs)


def test_streams_buckets_by_architecture_signature(cache):
    tasks = fit_tasks(cache, DATA, MIXED)
    buckets = bucket_by_architecture(tasks)
    assert [len(b) for b in buckets] == [2, 1, 1, 1, 1, 1, 1]
    assert all(len({t.job.hidden_layers for t in bucket}) == 1 for bucket in buckets)


def test_fused_packs_one_depth_and_dataset_together(cache):
    groups = FusedTrainer.plan_groups(fit_tasks(cache, DATA, MIXED))
    depths = [{len(t.job.hidden_layers) for t in group} for group in groups]
    assert depths == [{3}, {2}, {4}]


def test_bf16_moves_r2_little(cache):
    specs = MIXED[:2] + MIXED[4:5]
    fp32 = outcomes(FusedTrainer(SETTINGS, CPU), fit_tasks(cache, DATA, specs), 8)
    bf16 = outcomes(FusedTrainer(TrainSettings(40, 6, "bf16"), CPU), fit_tasks(cache, DATA, specs), 8)
    for key in fp32:
        assert bf16[key].status == STATUS_OK and abs(bf16[key].score - fp32[key].score) < 0.05


def test_dropout_masks_are_each_fits_own_masks_on_its_training_rows(cache):
    """A fit's masks over every row equal dropout_mask of the fit on its training rows and are 1 on
    its held-out rows, epoch after epoch (and differ between epochs); no dropout, no masks."""
    from watcher_plugins.nn_batch.dropout import dropout_mask, fit_key

    specs = [(0, 0, [64, 32], 1e-2, 0.0, 0.2), (1, 1, [16, 8], 1e-2, 0.0, 0.3), (2, 2, [64, 8], 1e-2, 0.0, 0.0)]
    for task in fit_tasks(cache, DATA, specs):
        fit, rows = TorchFit(task, SETTINGS, CPU), task.rows
        previous = None
        for epoch in range(2):
            masks = fit._masks(epoch)
            if task.job.dropout == 0:
                assert masks == [None, None]
                continue
            for layer, width in enumerate(task.job.hidden_layers):
                want = dropout_mask(fit_key(task.init_seed), epoch, layer, rows.train_idx, width, task.job.dropout)
                assert torch.equal(masks[layer][rows.train_idx], want), (task.key, layer)
                assert torch.equal(masks[layer][rows.val_idx], torch.ones(len(rows.val_idx), width))
            if previous is not None:
                assert not torch.equal(masks[0], previous)
            previous = masks[0]


def test_fused_plans_exact_architecture_packs_and_pads_only_leftovers(cache):
    """Architectures with MIN_EXACT_PACK fits or more get packs of their own; the rest of a depth share
    one padded pack; both kinds give serial's bits."""
    from watcher_plugins.nn_batch.fused import MIN_EXACT_PACK

    n = MIN_EXACT_PACK
    specs = [(t, t % 3, [64, 32], 1e-2, 0.0, 0.1 if t else 0.0) for t in range(n)]
    specs += [(n + t, t % 3, [32, 16], 5e-3, 1e-4, 0.2) for t in range(n)]
    specs += [(2 * n, 0, [128, 64], 1e-2, 0.0, 0.15), (2 * n + 1, 1, [16, 8], 2e-2, 0.0, 0.0),
              (2 * n + 2, 2, [64, 32, 16], 1e-2, 0.0, 0.1)]
    groups = FusedTrainer.plan_groups(fit_tasks(cache, DATA, specs))
    archs = [sorted({t.job.hidden_layers for t in g}) for g in groups]
    assert archs == [[(64, 32)], [(32, 16)], [(16, 8), (128, 64)], [(64, 32, 16)]]
    assert [t.job.dropout for t in groups[0]][0] == 0.0  # fits without dropout first
    fused = FusedTrainer(SETTINGS, CPU)
    got = outcomes(fused, fit_tasks(cache, DATA, specs), 16)
    assert sorted(fused.pack_sizes) == [1, 2, MIN_EXACT_PACK, MIN_EXACT_PACK]
    ref = outcomes(SerialTrainer(SETTINGS, CPU), fit_tasks(cache, DATA, specs), 1)
    for key in ref:
        assert got[key].status == STATUS_OK
        assert (got[key].score, got[key].best_epoch) == (ref[key].score, ref[key].best_epoch), key


def test_the_nets_r2_does_not_depend_on_the_targets_units(tmp_path):
    # The same data with the target in other units (a price: 300,000 + 100,000 y). The trees do not mind;
    # an unscaled target left the net's R² near -9 here, since it starts near 0 and Adam moves it by about
    # lr a step.
    from watcher_plugins.data import load_dataset

    survivors = load_dataset(DATA)
    np.savez(tmp_path / "price.npz", X=survivors.X, y=(3e5 + 1e5 * survivors.y.astype(np.float64)).astype(np.float32))
    price = DataRef(path=str(tmp_path / "price.npz"))
    r2 = {}
    for ref in (DATA, price):
        data = DeviceDatasetCache(CPU).get(ref)
        task = FitTask.build(FitJob(0, 0, 3, 11, (64, 32), 3e-3, 0.0, 0.0, ref), data)
        (r2[ref.key],) = [o.score for o in outcomes(SerialTrainer(SETTINGS, CPU), [task], 1).values()]
    assert r2[DATA.key] > 0.3
    assert abs(r2[price.key] - r2[DATA.key]) < 1e-3


def test_r2_is_computed_in_the_targets_own_units(tmp_path):
    # A heavy tail: 999 values in [0, 1] and one of 1e12. Standardised in float32, the bulk's values are
    # all one number: an R² computed against them would be 0.0 ("no better than the mean") whatever the
    # net predicts. Against the target as loaded it is the R² of the net's predictions, as the trees'.
    from watcher_plugins.data import r2_score
    from watcher_plugins.nn_batch.training import outcome_from_best

    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 4)).astype(np.float32)
    y = rng.uniform(size=1000)
    y[0] = 1e12
    np.savez(tmp_path / "tail.npz", X=X, y=y.astype(np.float32))
    ref = DataRef(path=str(tmp_path / "tail.npz"))
    data = DeviceDatasetCache(CPU).get(ref)
    task = FitTask.build(FitJob(0, 0, 2, 11, (8,), 1e-3, 0.0, 0.0, ref), data)
    val = task.rows.val_idx_host
    assert 0 not in val and len(set(data.y.numpy()[val])) == 1  # the bulk, one value once standardised
    net_output = torch.linspace(-0.04, -0.02, len(val))
    outcome = outcome_from_best(task, net_output, best_epoch=3, stop_epoch=5, seconds=0.1)
    expected = r2_score(data.y_host[val], data.in_target_units(net_output.numpy()))
    assert outcome.score == pytest.approx(expected) and outcome.score < -1.0


def test_where_the_triton_kernels_do_not_train_packs_fall_back_to_torch_with_a_warning(monkeypatch, caplog):
    from watcher_plugins.nn_batch import pack as pack_module

    def broken(self):
        raise RuntimeError("PassManager::run failed (injected)")

    monkeypatch.setattr(pack_module.TritonPack, "run_epoch", broken)
    pack_module.triton_trains.cache_clear()
    try:
        assert pack_module.triton_trains(CPU, "bf16") is False
    finally:
        pack_module.triton_trains.cache_clear()
    assert "do not train at bf16" in caplog.text and "PassManager::run failed (injected)" in caplog.text
