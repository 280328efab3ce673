"""The NN worker's progress estimate (batch.ProgressMeter): how much of a batch's work is done, from
the fits finished, the running fits' best epochs and the fits not yet started."""

from __future__ import annotations

import torch
from nn_cases import MIXED, SETTINGS, fit_tasks

from watcher_plugins.nn_batch.batch import ProgressMeter, epoch_cost, expected_epochs
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.serial import SerialTrainer
from watcher_plugins.nn_batch.training import FitOutcome, TrainSettings
from watcher_plugins.records import STATUS_OK

CPU = torch.device("cpu")


def test_a_running_fit_is_expected_to_run_out_its_patience_or_as_long_again_as_it_has_improved():
    assert expected_epochs(epoch=5, best_epoch=1, patience=10, cap=100) == 12  # patience from epoch 1
    assert expected_epochs(epoch=40, best_epoch=39, patience=10, cap=100) == 80  # still improving
    assert expected_epochs(epoch=70, best_epoch=69, patience=10, cap=100) == 100  # never past the cap
    assert expected_epochs(epoch=30, best_epoch=-1, patience=10, cap=100) == 30  # never below what it ran


def test_a_wider_or_deeper_fit_weighs_more_per_epoch():
    tasks = {task.job.hidden_layers: task for task in fit_tasks(DeviceDatasetCache(CPU))}
    assert epoch_cost(tasks[(512, 256, 128)]) > epoch_cost(tasks[(256, 128, 64)]) > epoch_cost(tasks[(128, 64)])
    assert epoch_cost(tasks[(256, 128, 64, 32)]) > epoch_cost(tasks[(256, 128, 64)])


def _run(trainer_cls, n_concurrent: int, settings: TrainSettings = SETTINGS) -> tuple[list[dict], list[FitOutcome]]:
    tasks = fit_tasks(DeviceDatasetCache(CPU))
    lines: list[dict] = []
    outcomes: list[FitOutcome] = []
    meter = ProgressMeter(len(tasks), settings, lines.append, interval_s=0.0)
    trainer = trainer_cls(settings, CPU)
    meter.start(tasks, trainer)

    def done(outcome: FitOutcome) -> None:
        outcomes.append(outcome)
        meter.fit_done(outcome)

    trainer.train(tasks, n_concurrent, done)
    return lines, outcomes


def test_a_batchs_share_done_only_grows_and_ends_when_its_last_fit_does():
    for trainer_cls, n_concurrent in ((FusedTrainer, len(MIXED)), (SerialTrainer, 1)):
        lines, outcomes = _run(trainer_cls, n_concurrent)
        assert len(outcomes) == len(MIXED) and all(o.status == STATUS_OK for o in outcomes)
        shares = [line["fraction_done"] for line in lines]
        assert shares == sorted(shares) and all(0 <= share <= 1 for share in shares), shares
        assert lines[-1]["fits_done"] == len(MIXED) and shares[-1] == 1.0
        before_last = [line["fraction_done"] for line in lines if line["fits_done"] < len(MIXED)]
        assert before_last[-1] < 1.0 and before_last[0] < 0.5, before_last
        epochs = [line["model_epochs"] for line in lines]
        assert epochs == sorted(epochs) and lines[-1]["fits"] == len(MIXED)


def test_fits_that_ran_to_the_cap_but_are_not_yet_sent_leave_the_batch_short_of_done():
    # Patience as long as the cap: every fit runs every epoch, so the last epoch's line comes while all
    # of them have run all their work and none has been scored and sent yet (CI saw 1.0 there).
    settings = TrainSettings(max_epochs=6, patience=6)
    lines, outcomes = _run(FusedTrainer, len(MIXED), settings)
    assert len(outcomes) == len(MIXED) and all(o.epochs == settings.max_epochs for o in outcomes)
    unfinished = [line["fraction_done"] for line in lines if line["fits_done"] < len(MIXED)]
    assert unfinished and max(unfinished) < 1.0, unfinished
    assert lines[-1]["fits_done"] == len(MIXED) and lines[-1]["fraction_done"] == 1.0


def test_fits_not_yet_started_count_the_finished_fits_mean_epochs():
    tasks = fit_tasks(DeviceDatasetCache(CPU))[:2]
    meter = ProgressMeter(2, SETTINGS, lambda line: None)
    meter.start(tasks, SerialTrainer(SETTINGS, CPU))
    assert meter.fraction_done() == 0.0
    meter.fit_done(FitOutcome(tasks[0].key, STATUS_OK, 0.5, 1.0, epochs=10))
    cost_done, cost_waiting = epoch_cost(tasks[0]), epoch_cost(tasks[1])
    assert meter.fraction_done() == cost_done * 10 / (cost_done * 10 + cost_waiting * 10)
