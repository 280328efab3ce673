"""RidgeExecutor: each trial's folds fitted in this process with scikit-learn, one after another.

A linear model on the run's k-fold splits is the baseline the other rows of the leaderboard should beat.
Features are standardised with the training fold's mean and deviation (never the held-out rows'); the
fit is deterministic (Ridge's closed form, ElasticNet's cyclic coordinate descent), so a trial's R² is
a function of its params, the data and the folds alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from watcher_plugins.data import Dataset, kfold_splits, load_dataset, r2_score
from watcher_plugins.errors import DataError
from watcher_plugins.executor import Executor, ResultCallback, RunContext
from watcher_plugins.records import STATUS_FAIL, STATUS_OK, FoldResult, TrialJob
from watcher_plugins.settings import ExecutorSettings


@dataclass(frozen=True)
class RidgeSettings(ExecutorSettings):
    schema_ref: ClassVar[str] = "watcher_ridge:params.schema.json"
    ridge_max_iter: int


def fit_fold(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, params: Mapping[str, Any],
             max_iter: int) -> tuple[np.ndarray, bool]:
    """Held-out predictions of one fold's model, and whether its solver converged."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import ElasticNet, Ridge

    mean = X_train.mean(axis=0)
    scale = X_train.std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature: centred to 0, left unscaled
    if params["l1_ratio"] == 0:
        model = Ridge(alpha=params["alpha"])
    else:
        model = ElasticNet(alpha=params["alpha"], l1_ratio=params["l1_ratio"], max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit((X_train - mean) / scale, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.predict((X_val - mean) / scale), converged


class RidgeExecutor(Executor):
    """Ridge / ElasticNet trials on the CPU, in the host process."""

    def __init__(self, params: Mapping[str, Any], context: RunContext):
        super().__init__(params, context)
        self.settings = RidgeSettings.from_params(params)
        self._datasets: dict[str, Dataset] = {}

    @classmethod
    def check(cls, params: Mapping[str, Any], context: RunContext) -> None:
        RidgeSettings.from_params(params)

    def _dataset(self, job: TrialJob) -> Dataset:
        if job.data.key not in self._datasets:
            self._datasets[job.data.key] = load_dataset(job.data)
        return self._datasets[job.data.key]

    def run_batch(self, jobs: Sequence[TrialJob], on_result: ResultCallback | None = None) -> list[FoldResult]:
        results = []
        for job in jobs:
            for result in self._run_trial(job):
                results.append(result)
                if on_result is not None:
                    on_result(result)
        return results

    def _run_trial(self, job: TrialJob) -> list[FoldResult]:
        try:
            dataset = self._dataset(job)
            splits = kfold_splits(dataset.n_rows, job.folds, job.seed)
        except DataError as exc:
            return [FoldResult(job.trial_number, k, job.model_type, None, 0.0, STATUS_FAIL, str(exc))
                    for k in range(job.folds)]
        X, y = dataset.X.astype(np.float64), dataset.y.astype(np.float64)
        out = []
        for k, (train, val) in enumerate(splits):
            started = time.perf_counter()
            try:
                pred, converged = fit_fold(X[train], y[train], X[val], job.params, self.settings.ridge_max_iter)
            except (ValueError, np.linalg.LinAlgError) as exc:  # a fold's fit fails alone, with its reason
                out.append(FoldResult(job.trial_number, k, job.model_type, None, time.perf_counter() - started,
                                      STATUS_FAIL, f"{type(exc).__name__}: {exc}"))
                continue
            out.append(FoldResult(job.trial_number, k, job.model_type, r2_score(y[val], pred),
                                  time.perf_counter() - started, STATUS_OK, info={"converged": converged}))
        return out
