"""The VRAM budget: the seed's estimate, sized from a byte budget, corrected by a measured peak, and
what n_concurrent_nn "auto" does with it."""

from __future__ import annotations

import torch

from watcher_plugins.nn_batch.budget import (
    VramBudget,
    estimate_vram_bytes,
    estimate_vram_mb,
    max_concurrent_for_budget,
)
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.nn_batch.training import FitTask, TrainSettings
from watcher_plugins.records import STATUS_OK, DataRef


def test_estimate_grows_with_rows_and_width_and_shrinks_with_bf16():
    base = estimate_vram_bytes([256, 128, 64], 79_027)
    assert estimate_vram_bytes([256, 128, 64], 2 * 79_027) > 1.9 * base
    assert estimate_vram_bytes([512, 256, 128], 79_027) > 1.9 * base
    assert estimate_vram_bytes([256, 128, 64], 79_027, dropout=True) == base  # masks are never stored
    assert estimate_vram_bytes([256, 128, 64], 79_027, precision="bf16") < base
    assert 100 < estimate_vram_mb([256, 128, 64], 79_027) < 1000  # the seed's "150-250 MB" ballpark, full batch


def test_max_concurrent_uses_the_worst_model_and_is_at_least_one():
    one = estimate_vram_bytes([512, 256], 10_000)
    assert max_concurrent_for_budget([[64, 32], [512, 256]], 10_000, 10 * one) == 10
    assert max_concurrent_for_budget([[512, 256]], 10_000, one / 2) == 1


def test_measured_peak_corrects_pack_sizes():
    widths = [[256, 128]] * 40
    one = estimate_vram_bytes([256, 128], 50_000)
    budget = VramBudget(10 * one)
    assert budget.pack_size(widths, 50_000, 62, "fp32", False, cap=100) == 10
    budget.calibrate("fp32", estimated_bytes=4 * one, measured_bytes=8 * one)  # twice the estimate
    assert budget.pack_size(widths, 50_000, 62, "fp32", False, cap=100) == 5
    assert budget.pack_size(widths, 50_000, 62, "bf16", False, cap=100) > 5  # corrections are per precision
    assert budget.pack_size(widths, 50_000, 62, "fp32", False, cap=3) == 3


def test_pack_size_counts_padding_to_the_widest_model():
    one_small = estimate_vram_bytes([64, 32], 50_000)
    budget = VramBudget(4.5 * one_small)
    assert budget.pack_size([[64, 32]] * 8, 50_000, 62, "fp32", False, cap=8) == 4
    assert budget.pack_size([[512, 256]] + [[64, 32]] * 7, 50_000, 62, "fp32", False, cap=8) == 1


def _six_small_fits():
    """Six [32, 16] fits on 300 rows, on the CPU: the device, data, jobs, settings, and one's estimate."""
    cpu = torch.device("cpu")
    data_ref = DataRef(embedded="survivors", rows=300)
    data = DeviceDatasetCache(cpu).get(data_ref)
    jobs = [FitJob(t, 0, 2, 1, (32, 16), 1e-2, 0.0, 0.0, data_ref) for t in range(6)]
    return cpu, data, jobs, TrainSettings(max_epochs=10, patience=3), estimate_vram_bytes([32, 16], data.n_rows,
                                                                                         data.n_features)


def test_auto_packs_follow_the_budget_and_results_do_not_change():
    cpu, data, jobs, settings, per_model = _six_small_fits()
    results = {}
    for name, budget in (("roomy", VramBudget(100 * per_model)), ("tight", VramBudget(2.5 * per_model))):
        trainer = FusedTrainer(settings, cpu, budget=budget)
        got: dict = {}
        trainer.train([FitTask.build(job, data) for job in jobs], 6, lambda o, got=got: got.__setitem__(o.key, o))
        results[name] = (trainer.pack_sizes, got)
    assert results["roomy"][0] == [6] and results["tight"][0] == [2, 2, 2]
    for key, outcome in results["roomy"][1].items():
        assert outcome.status == STATUS_OK and abs(outcome.score - results["tight"][1][key].score) < 1e-4


def test_a_pack_abandoned_at_calibration_is_not_counted():
    # The first pack's measured peak is three times its estimate: after its 2 measured epochs it is
    # abandoned and its fits are planned again. The batch's pack sizes and model epochs are those of the
    # packs that trained, as with a budget calibrated beforehand.
    cpu, data, jobs, settings, per_model = _six_small_fits()

    class MeasuredOnCpu(FusedTrainer):
        """The trainer's CUDA peak measurement, on the CPU."""

        def _peak_meter(self):
            if self.budget.is_calibrated(self.settings.precision):
                return None
            return lambda: 3 * 6 * per_model

    def trained(trainer: FusedTrainer) -> FusedTrainer:
        trainer.train([FitTask.build(job, data) for job in jobs], 6, lambda outcome: None)
        return trainer

    measured = trained(MeasuredOnCpu(settings, cpu, budget=VramBudget(6.3 * per_model)))
    known = VramBudget(6.3 * per_model)
    known.calibrate("fp32", estimated_bytes=1, measured_bytes=3)
    calibrated = trained(FusedTrainer(settings, cpu, budget=known))
    assert calibrated.pack_sizes == [2, 2, 2]
    assert measured.pack_sizes == [2, 2, 2]
    assert measured.model_epochs == calibrated.model_epochs
