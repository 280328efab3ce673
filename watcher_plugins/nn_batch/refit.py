"""A refit in the NN worker (the "refit" request): a best trial's folds again, then one fit on every row,
saved (saved.py).

1. **Out of fold.** The trial's folds train again through the worker's batch runner with the study's
   settings, as the study trained them: a fit's numbers depend on nothing but the fit (pack.py), so
   each fold's score is the study's fold score, bit for bit, on the same device type, precision and
   thread count. The folds' best-epoch held-out predictions, placed at their rows, are ``oof`` (the
   target's units, or probabilities).
2. **Every row.** The preprocessing is fitted on every row (device_data.full_preprocessing); the
   regression target keeps its whole-dataset standardisation. One TorchFit (pack.py: the one
   computation of a fit) trains on every row for ``refit_epochs`` epochs with no early stopping (there
   are no held-out rows: the held-out loss is not computed from any): epochs 0..E-1 evaluate, and each
   but the last steps, so the model is the one of epoch E-1, after E-1 Adam steps, as a study's fit at
   best epoch E-1 is. Its init seed is records.fold_seed(seed, trial, folds): the fold index one past
   the last. It trains on the worker's device (on CUDA as a torch fit, not a Triton pack).
3. **Saved.** nn_state.pt and nn_model.json in the job's model_dir (saved.py); ``predictions`` are
   saved.predict of the saved files on every row, computed here, so predicting the same rows later
   gives them exactly.

The oof and predictions arrays go to the host in an npz file in the model_dir
(protocol.REFIT_ARRAYS_FILE), which the executor reads and removes (client.load_refit_arrays).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from watcher_plugins.data import kfold_splits
from watcher_plugins.nn_batch import saved
from watcher_plugins.nn_batch.batch import BatchRunner
from watcher_plugins.nn_batch.device_data import DeviceDataset, all_rows, full_preprocessing
from watcher_plugins.nn_batch.pack import TorchFit
from watcher_plugins.nn_batch.protocol import REFIT_ARRAYS_FILE, BatchSettings, FitJob
from watcher_plugins.nn_batch.training import FitOutcome, FitTask, TrainSettings, precision_context
from watcher_plugins.records import STATUS_FAIL, STATUS_OK, RefitJob, RefitResult, fold_seed


@dataclass
class RefitOutput:
    """A refit's result (its oof and predictions left empty: they travel as arrays) and its arrays."""

    result: RefitResult
    result_dir: str  # the job's model_dir
    oof: np.ndarray | None = None
    predictions: np.ndarray | None = None

    def write_arrays(self) -> str | None:
        """The oof and predictions in REFIT_ARRAYS_FILE in the model dir; its path (None for a failed refit)."""
        if self.result.status != STATUS_OK or self.oof is None or self.predictions is None:
            return None
        path = os.path.join(self.result_dir, REFIT_ARRAYS_FILE)
        np.savez(path, oof=self.oof, predictions=self.predictions)
        return path


def refit_epochs(fold_info: Sequence[dict], outcomes: Sequence[FitOutcome]) -> tuple[int, list[int]]:
    """(epochs of the fit on every row, the folds' best epochs): round(mean over folds of (best_epoch + 1))
    (Python's round, at least 1), from the study's fold infos, or where they lack one from the refit's
    folds (the same fits)."""
    best = [info.get("best_epoch") for info in fold_info]
    epochs = [b for b in best if isinstance(b, int) and not isinstance(b, bool) and b >= 0]
    if len(epochs) != len(outcomes) or len(epochs) != len(best):
        epochs = [o.best_epoch for o in outcomes]
    return max(1, round(sum(b + 1 for b in epochs) / len(epochs))), epochs


def train_on_every_row(job: FitJob, data: DeviceDataset, settings: TrainSettings, epochs: int) -> TorchFit:
    """One TorchFit on every row of ``data`` for ``epochs`` epochs (the module docstring's step 2)."""
    task = FitTask(job=job, data=data, rows=all_rows(data.n_rows, data.X.device))
    fit = TorchFit(task, settings, data.X.device)
    with precision_context(settings.precision, data.X.device):
        for epoch in range(epochs - 1):  # the last epoch only evaluates: no step after it
            fit.epoch(epoch, stepping=True)
    return fit


def run_refit(runner: BatchRunner, job: RefitJob, fits: Sequence[FitJob], batch: BatchSettings,
              emit: Callable[[FitOutcome], None]) -> RefitOutput:
    """The refit of ``job`` (its trial's folds ``fits``) on the runner's device; ``emit`` sees each fold's
    outcome as it finishes. Failures are a result with status "fail", never an exception, but a fatal
    device error (batch.is_fatal_device_error), which propagates."""
    from watcher_plugins.nn_batch.batch import is_fatal_device_error

    started = time.perf_counter()
    trial = job.trial
    output = RefitOutput(RefitResult("nn", trial.trial_number, STATUS_FAIL), result_dir=job.model_dir)

    def fail(error: str) -> RefitOutput:
        output.result.error = error
        output.result.seconds = round(time.perf_counter() - started, 4)
        return output

    outcomes: dict[tuple[int, int], FitOutcome] = {}

    def on_outcome(outcome: FitOutcome) -> None:
        outcomes[outcome.key] = outcome
        emit(outcome)

    runner.run(fits, batch, on_outcome)
    ordered = [outcomes.get(fit.key) for fit in fits]
    failed = [(fit, o) for fit, o in zip(fits, ordered) if o is None or o.status != STATUS_OK]
    if failed:
        bad, outcome = failed[0]
        return fail(f"fold {bad.fold_idx} of trial {trial.trial_number} did not train again: "
                    f"{outcome.status + ': ' + str(outcome.error) if outcome is not None else 'no result'}")
    done = [o for o in ordered if o is not None]
    try:
        dataset = runner.cache.dataset(trial.data)
        oof = _out_of_fold(dataset.n_rows, trial.folds, trial.seed, done)
        epochs, best_epochs = refit_epochs(job.fold_info, done)
        preprocessing = full_preprocessing(dataset)
        data = DeviceDataset.from_dataset(f"{trial.data.key}|all rows", dataset, runner.device, preprocessing)
        settings = TrainSettings(batch.max_epochs, batch.patience, batch.precision)
        first = fits[0]
        every_row = FitJob(first.trial_number, trial.folds, trial.folds, first.seed, first.hidden_layers, first.lr,
                           first.weight_decay, first.dropout, first.data, first.metric)
        fit = train_on_every_row(every_row, data, settings, epochs)
        if not all(bool(torch.isfinite(p).all()) for p in fit.params):
            return fail(f"the fit on every row diverged (non-finite weights after {epochs - 1} steps)")
        meta: dict[str, Any] = {
            "task": dataset.task, "n_classes": len(dataset.classes), "n_inputs": data.n_features,
            "hidden_layers": list(first.hidden_layers), "n_outputs": data.n_outputs, "precision": batch.precision,
            "epochs": epochs, "adam_steps": epochs - 1, "target_mean": data.y_mean, "target_std": data.y_std,
            "preprocessing": preprocessing.to_json(),
            "input_names": preprocessing.input_names(dataset.feature_names),
            "trained_on": str(runner.device), "torch": torch.__version__,
            "trial_number": trial.trial_number, "params": trial.params, "metric": trial.metric,
            "seed": trial.seed, "folds": trial.folds,
            "init_seed": fold_seed(trial.seed, trial.trial_number, trial.folds),
            "fold_best_epochs": best_epochs,
        }
        files = saved.save(Path(job.model_dir), fit.params, meta)
        predictions = saved.predict(Path(job.model_dir), dataset.X)
    except Exception as exc:  # noqa: BLE001 - a refit that breaks is a failed result (the studies stand)
        if is_fatal_device_error(exc):
            raise
        return fail(f"{type(exc).__name__}: {exc}")
    output.result.status = STATUS_OK
    output.result.fold_scores = [o.score for o in done]
    output.result.files = files
    output.result.info = {"epochs": epochs, "adam_steps": epochs - 1, "fold_best_epochs": best_epochs,
                          "n_inputs": data.n_features, "device": str(runner.device), "precision": batch.precision}
    output.result.seconds = round(time.perf_counter() - started, 4)
    output.oof, output.predictions = oof, predictions
    return output


def _out_of_fold(n_rows: int, folds: int, seed: int, outcomes: Sequence[FitOutcome]) -> np.ndarray:
    """Each fold's held-out predictions at their rows: [n_rows] or [n_rows, classes], float64."""
    splits = kfold_splits(n_rows, folds, seed)
    first = outcomes[0].predictions
    assert first is not None  # an ok outcome carries its predictions (training.outcome_from_best)
    oof = np.full((n_rows, *first.shape[1:]), math.nan)
    for (_, held_out), outcome in zip(splits, outcomes):
        oof[held_out] = outcome.predictions
    return oof
