"""The end of step 5 (``refit_best``): each model type's best trial refit and saved, its out-of-fold
predictions written.

For each model type with a best trial, its executor (Executor.refit) trains the trial's folds once more,
for their held-out predictions, and one model on every row, saved in the library's own format under
``output_dir/models/<model_type>/`` beside the ``model.json`` written here (what ``watcher-agent
predict`` reads). A model directory is written under a temporary name and renamed into place, so that a
failed refit leaves the previous run's model, never half of one. ``oof_predictions.csv`` holds every
row's held-out prediction of each best trial; the fold scores computed from it are the study's.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from watcher_plugins.executor import Executor
from watcher_plugins.records import STATUS_OK, DataRef, RefitJob, RefitResult, TrialJob
from watcher_plugins.tasks import REGRESSION, Metric

logger = logging.getLogger(__name__)
MODELS_DIR = "models"
OOF_FILE = "oof_predictions.csv"


@dataclass
class RefitOutcome:
    """What summary.json says of one model type's refit."""

    status: str  # "saved" | "failed"
    path: str | None = None
    trial_number: int | None = None
    error: str | None = None
    oof_fold_scores: list[float | None] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BestTrial:
    """A model type's best trial as the study holds it."""

    model_type: str
    executor: str
    number: int
    params: dict[str, Any]
    fold_scores: list[float | None]
    fold_info: list[dict]


def refit_best(executor: Executor, best: list[BestTrial], dataset, data: DataRef, params: Mapping[str, Any],
               metric: Metric, output_dir: Path,
               say: Callable[[str], None]) -> tuple[dict[str, RefitOutcome], dict[str, RefitResult]]:
    """Refit the best trials of one executor's model types; returns the outcomes and the results that saved.
    ``say`` writes a line for the operator (ProgressBoard.note: above the bars while they are drawn)."""
    models = output_dir / MODELS_DIR
    models.mkdir(exist_ok=True)
    jobs, staging = [], {}
    for trial in best:
        staging[trial.model_type] = models / f".{trial.model_type}.partial-{os.getpid()}"
        shutil.rmtree(staging[trial.model_type], ignore_errors=True)
        staging[trial.model_type].mkdir()
        job = TrialJob(model_type=trial.model_type, trial_number=trial.number, params=trial.params, data=data,
                       folds=params["folds"], seed=params["seed"], metric=metric.name)
        jobs.append(RefitJob(job, str(staging[trial.model_type]), trial.fold_info))
        say(f"compare_models: refitting {trial.model_type}'s best trial ({trial.number}) on all {dataset.n_rows} rows")
    outcomes: dict[str, RefitOutcome] = {}
    saved: dict[str, RefitResult] = {}
    try:
        results = {r.model_type: r for r in executor.refit(jobs)}
        for trial in best:
            result = results.get(trial.model_type)
            if result is None or result.status != STATUS_OK:
                error = result.error if result is not None else "the executor returned no refit result"
                outcomes[trial.model_type] = RefitOutcome("failed", trial_number=trial.number, error=error)
                say(f"compare_models: {trial.model_type}: no model saved: {error}")
                continue
            outcomes[trial.model_type] = _install(trial, result, staging[trial.model_type], models, dataset, metric)
            saved[trial.model_type] = result
    finally:
        for path in staging.values():
            shutil.rmtree(path, ignore_errors=True)
    return outcomes, saved


def _install(trial: BestTrial, result: RefitResult, staged: Path, models: Path, dataset,
             metric: Metric) -> RefitOutcome:
    """Write model.json beside the executor's files and move the model directory into place."""
    from watcher_plugins.predict import write_model_json

    if result.fold_scores != trial.fold_scores and trial.fold_scores:
        # The refit trains the same folds with the same seeds: a difference means another machine or
        # library version; the saved model is still the best params', say so rather than hide it.
        logger.warning("%s trial %d: the refit's fold scores %s differ from the study's %s (another device or "
                       "library version?)", trial.model_type, trial.number, result.fold_scores, trial.fold_scores)
    write_model_json(staged, model_type=trial.model_type, executor=trial.executor, trial_number=trial.number,
                     params=trial.params, metric=metric.name, task=dataset.task, classes=list(dataset.classes),
                     feature_schema=dataset.schema().to_json(), fold_scores=result.fold_scores,
                     files=result.files, info=result.info)
    target = models / trial.model_type
    old = models / f".{trial.model_type}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return RefitOutcome("saved", str(target), trial.number, oof_fold_scores=result.fold_scores, info=result.info)


def write_oof(output_dir: Path, dataset, splits: list[tuple[np.ndarray, np.ndarray]],
              saved: Mapping[str, RefitResult]) -> Path | None:
    """oof_predictions.csv: per data row (counted from 1) its fold, its target and each best trial's
    held-out prediction (regression: the value; classification: one probability column per class).
    Floats as repr, so that they read back to the same bits."""
    if not saved:
        return None
    fold_of = np.empty(dataset.n_rows, dtype=np.int64)
    for k, (_, held_out) in enumerate(splits):
        fold_of[held_out] = k
    header = ["row", "fold", dataset.target]
    columns: list[list[Any]] = []
    for model_type, result in saved.items():
        if dataset.task == REGRESSION:
            header.append(model_type)
            columns.append([repr(float(v)) for v in result.oof])
        else:
            probabilities = np.asarray(result.oof, dtype=np.float64).reshape(dataset.n_rows, -1)
            if probabilities.shape[1] == 1:  # binary: the probability of class 1
                probabilities = np.column_stack([1.0 - probabilities[:, 0], probabilities[:, 0]])
            for c, label in enumerate(dataset.classes):
                header.append(f"{model_type}_probability_{label}")
                columns.append([repr(float(v)) for v in probabilities[:, c]])
    targets = ([repr(float(v)) for v in dataset.y] if dataset.task == REGRESSION
               else [dataset.classes[int(v)] for v in dataset.y])
    path = output_dir / OOF_FILE
    tmp = path.with_name(f".{OOF_FILE}.{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(dataset.n_rows):
            writer.writerow([i + 1, int(fold_of[i]), targets[i], *(column[i] for column in columns)])
    os.replace(tmp, path)
    return path
