"""Tasks and metrics: what a study optimises, and how a fold's held-out predictions are scored.

A task is what the target is: ``regression`` (a number), ``binary`` (two classes) or ``multiclass``
(three or more). Predictions, as every executor hands them to ``score``, in float64:

- regression: the predicted values, shape [n];
- binary: the probability of class 1 (the second of the dataset's ``classes``), shape [n];
- multiclass: one probability per class, shape [n, classes], rows summing to 1.

Class targets are codes 0..C-1 into the dataset's ``classes``. Only numpy here: every worker imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

REGRESSION, BINARY, MULTICLASS = "regression", "binary", "multiclass"
TASKS = (REGRESSION, BINARY, MULTICLASS)
#: Probabilities are clipped this far from 0 and 1 before a log: a confident wrong answer costs
#: -log(1e-15) ≈ 34.5, not infinity (scikit-learn's convention).
_LOG_EPS = 1e-15


@dataclass(frozen=True)
class Metric:
    name: str
    display: str  # as the leaderboard and the report spell it
    direction: Literal["maximize", "minimize"]  # Optuna's
    tasks: tuple[str, ...]
    compute: Callable[[np.ndarray, np.ndarray, str], float]

    @property
    def greater_is_better(self) -> bool:
        return self.direction == "maximize"


def r2(y_true: np.ndarray, y_pred: np.ndarray, task: str = REGRESSION) -> float:
    """Coefficient of determination, in float64 (0.0 where the held-out target is constant)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0


def rmse(y_true: np.ndarray, y_pred: np.ndarray, task: str = REGRESSION) -> float:
    diff = np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff)))


def mae(y_true: np.ndarray, y_pred: np.ndarray, task: str = REGRESSION) -> float:
    return float(np.mean(np.abs(np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64))))


def _class_probabilities(y_pred: np.ndarray, task: str) -> np.ndarray:
    """[n, C] probabilities from a binary [n] (of class 1) or a multiclass [n, C] prediction."""
    p = np.asarray(y_pred, dtype=np.float64)
    if task == BINARY:
        return np.column_stack([1.0 - p, p])
    return p


def logloss(y_true: np.ndarray, y_pred: np.ndarray, task: str = BINARY) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    p = _class_probabilities(y_pred, task)
    codes = np.asarray(y_true).astype(np.int64)
    chosen = np.clip(p[np.arange(len(codes)), codes], _LOG_EPS, 1.0 - _LOG_EPS)
    return float(-np.mean(np.log(chosen)))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, task: str = BINARY) -> float:
    """Share of rows whose most probable class is the true one (binary: probability >= 0.5 is class 1)."""
    codes = np.asarray(y_true).astype(np.int64)
    if task == BINARY:
        chosen = (np.asarray(y_pred, dtype=np.float64) >= 0.5).astype(np.int64)
    else:
        chosen = np.argmax(np.asarray(y_pred, dtype=np.float64), axis=1)
    return float(np.mean(chosen == codes))


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic with ties counted half (0.5 when one
    class is absent: no ranking to judge)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average ranks (1-based) over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc(y_true: np.ndarray, y_pred: np.ndarray, task: str = BINARY) -> float:
    """ROC AUC; multiclass: the unweighted mean of each class against the rest."""
    codes = np.asarray(y_true).astype(np.int64)
    if task == BINARY:
        return _binary_auc(codes == 1, np.asarray(y_pred, dtype=np.float64))
    p = np.asarray(y_pred, dtype=np.float64)
    return float(np.mean([_binary_auc(codes == c, p[:, c]) for c in range(p.shape[1])]))


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("r2", "R²", "maximize", (REGRESSION,), r2),
    Metric("rmse", "RMSE", "minimize", (REGRESSION,), rmse),
    Metric("mae", "MAE", "minimize", (REGRESSION,), mae),
    Metric("logloss", "log loss", "minimize", (BINARY, MULTICLASS), logloss),
    Metric("auc", "AUC", "maximize", (BINARY, MULTICLASS), auc),
    Metric("accuracy", "accuracy", "maximize", (BINARY, MULTICLASS), accuracy),
)}
#: The metric a study optimises when the params name none.
DEFAULT_METRICS = {REGRESSION: "r2", BINARY: "logloss", MULTICLASS: "logloss"}


def metric_for(task: str, name: str | None) -> Metric:
    """The metric ``name`` (or the task's default), refused where it does not score this task."""
    metric = METRICS[name or DEFAULT_METRICS[task]]
    if task not in metric.tasks:
        raise ValueError(f"metric {metric.name!r} does not score a {task} task; "
                         f"metrics for {task}: {', '.join(m for m, v in METRICS.items() if task in v.tasks)}")
    return metric


def score(metric: str, task: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """``metric`` of held-out predictions (module docstring: their shapes), in float64."""
    return METRICS[metric].compute(y_true, y_pred, task)
