"""RidgeExecutor: each trial's folds fitted in this process with scikit-learn, one after another.

A linear model on the run's k-fold splits is the baseline the other rows of the leaderboard should beat.
Regression fits Ridge (l1_ratio 0) or ElasticNet; binary and multiclass targets fit LogisticRegression
(C = 1/alpha; l1_ratio 0: the L2 penalty with lbfgs, else the elastic net with saga), its probabilities
ordered by class code. Every fold's preprocessing (model.py: median imputation with missing indicators,
one-hot categories with an "other" column, standardisation) is fitted on its training rows only. The fits
are deterministic (Ridge's closed form, ElasticNet's cyclic coordinate descent, lbfgs; saga shuffles with
a seed of the trial and fold), so a fold's score is a function of its params, the data and the folds alone:
a refit scores the same folds exactly as the study did.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from watcher_plugins.data import Dataset, kfold_splits, load_dataset
from watcher_plugins.errors import DataError
from watcher_plugins.executor import Executor, ResultCallback, RunContext
from watcher_plugins.records import (
    STATUS_FAIL,
    STATUS_OK,
    FoldResult,
    RefitJob,
    RefitResult,
    TrialJob,
    fold_seed,
)
from watcher_plugins.settings import ExecutorSettings
from watcher_plugins.tasks import REGRESSION, score
from watcher_ridge.model import MODEL_FILE, LinearModel, Preprocessing, fit_preprocessing, load_model


@dataclass(frozen=True)
class RidgeSettings(ExecutorSettings):
    schema_ref: ClassVar[str] = "watcher_ridge:params.schema.json"
    ridge_max_iter: int


def _estimator(params: Mapping[str, Any], max_iter: int, task: str, seed: int):
    from sklearn.linear_model import ElasticNet, LogisticRegression, Ridge

    alpha, l1_ratio = params["alpha"], params["l1_ratio"]
    if task == REGRESSION:
        if l1_ratio == 0:
            return Ridge(alpha=alpha)
        return ElasticNet(alpha=alpha, l1_ratio=l1_ratio, max_iter=max_iter)
    kwargs: dict[str, Any] = {"C": 1.0 / alpha, "max_iter": max_iter, "random_state": seed}
    if l1_ratio == 0:
        return LogisticRegression(solver="lbfgs", **kwargs)  # the L2 penalty: the default of every release
    if _penalty_is_deprecated():  # scikit-learn 1.8 on: l1_ratio alone says the penalty
        return LogisticRegression(solver="saga", l1_ratio=l1_ratio, **kwargs)
    return LogisticRegression(solver="saga", penalty="elasticnet", l1_ratio=l1_ratio, **kwargs)


def _penalty_is_deprecated() -> bool:
    import sklearn

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    return (major, minor) >= (1, 8)


def _fit(Z: np.ndarray, y: np.ndarray, params: Mapping[str, Any], max_iter: int, task: str, seed: int):
    """The estimator fitted on the standardised design Z, and whether its solver converged."""
    from sklearn.exceptions import ConvergenceWarning

    model = _estimator(params, max_iter, task, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(Z, y if task == REGRESSION else y.astype(np.int64))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged


def fit_fold(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, params: Mapping[str, Any],
             max_iter: int, *, task: str = REGRESSION, n_classes: int = 0, categorical: Sequence[int] = (),
             seed: int = 0) -> tuple[np.ndarray, bool]:
    """Held-out predictions of one fold's model (shaped as tasks.py says), and whether its solver converged.
    The preprocessing is fitted on X_train alone."""
    preprocessing = fit_preprocessing(X_train, categorical)
    model, converged = _fit(preprocessing.transform(X_train), y_train, params, max_iter, task, seed)
    Z_val = preprocessing.transform(X_val)
    if task == REGRESSION:
        return model.predict(Z_val), converged
    probabilities = np.zeros((Z_val.shape[0], n_classes), dtype=np.float64)
    probabilities[:, model.classes_.astype(np.int64)] = model.predict_proba(Z_val)  # a class unseen: 0
    return (probabilities[:, 1] if n_classes == 2 else probabilities), converged


def fit_model(X: np.ndarray, y: np.ndarray, params: Mapping[str, Any], max_iter: int, *, task: str = REGRESSION,
              n_classes: int = 0, categorical: Sequence[int] = (), seed: int = 0, feature_names: Sequence[str] = (),
              categories: Mapping[str, Sequence[str]] | None = None) -> tuple[LinearModel, bool]:
    """One model on every row given, as the numbers a LinearModel holds."""
    preprocessing: Preprocessing = fit_preprocessing(X, categorical, feature_names, categories)
    model, converged = _fit(preprocessing.transform(X), y, params, max_iter, task, seed)
    coef = np.atleast_2d(np.asarray(model.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(model.intercept_, dtype=np.float64))
    class_codes = () if task == REGRESSION else tuple(int(c) for c in model.classes_)
    return LinearModel(task, type(model).__name__, preprocessing, np.ascontiguousarray(coef), intercept,
                       n_classes, class_codes, dict(params)), converged


class RidgeExecutor(Executor):
    """Ridge / ElasticNet / LogisticRegression trials on the CPU, in the host process."""

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

    def _folds(self, job: TrialJob, dataset: Dataset):
        """Each fold's (held-out rows, predictions, converged, seconds), or (held-out rows, None, error,
        seconds) where its fit failed: the same numbers for a study's trial and its refit."""
        X, y = dataset.X.astype(np.float64), dataset.y.astype(np.float64)
        for k, (train, val) in enumerate(kfold_splits(dataset.n_rows, job.folds, job.seed)):
            started = time.perf_counter()
            try:
                pred, converged = fit_fold(X[train], y[train], X[val], job.params, self.settings.ridge_max_iter,
                                           task=dataset.task, n_classes=len(dataset.classes),
                                           categorical=dataset.categorical_columns,
                                           seed=fold_seed(job.seed, job.trial_number, k))
            except (ValueError, np.linalg.LinAlgError) as exc:  # a fold's fit fails alone, with its reason
                yield val, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started
                continue
            yield val, pred, converged, time.perf_counter() - started

    def _run_trial(self, job: TrialJob) -> list[FoldResult]:
        try:
            dataset = self._dataset(job)
            kfold_splits(dataset.n_rows, job.folds, job.seed)
        except DataError as exc:
            return [FoldResult(job.trial_number, k, job.model_type, None, 0.0, STATUS_FAIL, str(exc))
                    for k in range(job.folds)]
        out = []
        for k, (val, pred, outcome, seconds) in enumerate(self._folds(job, dataset)):
            if pred is None:
                out.append(FoldResult(job.trial_number, k, job.model_type, None, seconds, STATUS_FAIL, str(outcome)))
            else:
                out.append(FoldResult(job.trial_number, k, job.model_type,
                                      score(job.metric, dataset.task, dataset.y[val], pred), seconds, STATUS_OK,
                                      info={"converged": outcome}))
        return out

    def refit(self, jobs: Sequence[RefitJob]) -> list[RefitResult]:
        return [self._refit(job) for job in jobs]

    def _refit(self, refit: RefitJob) -> RefitResult:
        job = refit.trial
        started = time.perf_counter()

        def failed(error: str) -> RefitResult:
            return RefitResult(job.model_type, job.trial_number, STATUS_FAIL, seconds=time.perf_counter() - started,
                               error=error)

        try:
            dataset = self._dataset(job)
            kfold_splits(dataset.n_rows, job.folds, job.seed)
        except DataError as exc:
            return failed(str(exc))
        n_classes = len(dataset.classes)
        oof = np.full((dataset.n_rows, n_classes) if n_classes > 2 else (dataset.n_rows,), np.nan)
        fold_scores: list[float | None] = []
        for k, (val, pred, outcome, _) in enumerate(self._folds(job, dataset)):
            if pred is None:
                return failed(f"fold {k}: {outcome}")
            oof[val] = pred
            fold_scores.append(score(job.metric, dataset.task, dataset.y[val], pred))
        X, y = dataset.X.astype(np.float64), dataset.y.astype(np.float64)
        try:
            model, converged = fit_model(X, y, job.params, self.settings.ridge_max_iter, task=dataset.task,
                                         n_classes=n_classes, categorical=dataset.categorical_columns,
                                         seed=fold_seed(job.seed, job.trial_number, job.folds),
                                         feature_names=dataset.feature_names, categories=dataset.categories)
            model.save(refit.model_dir)
        except (ValueError, np.linalg.LinAlgError, OSError) as exc:
            return failed(f"the fit on every row: {type(exc).__name__}: {exc}")
        # What predict computes: the model read back from its file, applied with numpy to every row.
        predictions = load_model(refit.model_dir).predict(X)
        return RefitResult(job.model_type, job.trial_number, STATUS_OK, oof=oof.tolist(), fold_scores=fold_scores,
                           predictions=predictions.tolist(), files=[MODEL_FILE],
                           seconds=time.perf_counter() - started,
                           info={"estimator": model.estimator, "converged": converged, "rows": dataset.n_rows,
                                 "design_columns": int(model.coef.shape[1])})

