"""Records that cross process boundaries: trial jobs and their per-fold results.

They are plain dataclasses with JSON round-trips, because they travel over pipes to worker
processes (the NN worker's JSON lines, the tree pool's queues).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

STATUS_OK = "ok"
STATUS_FAIL = "fail"
STATUS_OOM = "oom"
STATUSES = (STATUS_OK, STATUS_FAIL, STATUS_OOM)


@dataclass(frozen=True)
class DataRef:
    """Where a worker finds the dataset: the embedded survivors data (by row count) or a user file."""

    embedded: str | None = None
    rows: int | None = None
    path: str | None = None
    target: str | None = None
    format: str | None = None
    categorical: tuple[str, ...] | None = None  # columns read as categories, besides those detected
    drop_missing_target: bool | None = None
    task: str | None = None  # as asked: "auto" (None) | "regression" | "binary" | "multiclass"
    max_categories: int | None = None

    def __post_init__(self):
        if self.categorical is not None:  # a JSON list; a tuple keeps the record hashable
            object.__setattr__(self, "categorical", tuple(self.categorical))

    @classmethod
    def from_param(cls, data: dict) -> DataRef:
        return cls(**data)

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if "categorical" in out:
            out["categorical"] = list(out["categorical"])
        return out

    @property
    def key(self) -> str:
        """A stable identity, used to cache the loaded dataset in a worker."""
        if self.embedded:
            return f"embedded:{self.embedded}:{self.rows}"
        options = {k: v for k, v in self.to_json().items() if k not in ("embedded", "rows", "path", "target", "format")}
        return f"file:{self.path}:{self.target}:{self.format}" + (f":{json.dumps(options, sort_keys=True)}" if options else "")


@dataclass(frozen=True)
class TrialJob:
    """One Optuna trial of one model type: train it on every fold of the k-fold split."""

    model_type: str
    trial_number: int
    params: dict[str, Any]
    data: DataRef
    folds: int
    seed: int
    metric: str = "r2"  # what each fold is scored by (tasks.METRICS)

    def to_json(self) -> dict:
        out = asdict(self)
        out["data"] = self.data.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict) -> TrialJob:
        return cls(**{**obj, "data": DataRef(**obj["data"])})


@dataclass
class FoldResult:
    """The outcome of one fold of one trial: ``score`` is its job's metric of the held-out predictions,
    None unless status is "ok"."""

    trial_number: int
    fold_idx: int
    model_type: str
    score: float | None
    seconds: float
    status: str = STATUS_OK
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> FoldResult:
        return cls(**obj)


def fold_seed(seed: int, trial_number: int, fold_idx: int) -> int:
    """The seed of one model fit, a pure function of the study seed, trial and fold (never of scheduling)."""
    return (seed * 1_000_003 + trial_number * 1_009 + fold_idx) % (2**31 - 1)


@dataclass(frozen=True)
class RefitJob:
    """Refit one model type's best trial (``refit_best``): its folds once more, for their held-out
    predictions (out of fold), then one fit on every row, saved under ``model_dir``.

    ``fold_info`` is each fold's FoldResult.info from the study (its best iteration or epoch, say), in
    fold order: the fit on every row has no held-out rows to stop on, so it takes its length from them.
    """

    trial: TrialJob
    model_dir: str
    fold_info: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"trial": self.trial.to_json(), "model_dir": self.model_dir, "fold_info": self.fold_info}

    @classmethod
    def from_json(cls, obj: dict) -> RefitJob:
        return cls(TrialJob.from_json(obj["trial"]), obj["model_dir"], list(obj.get("fold_info", [])))


@dataclass
class RefitResult:
    """What a refit gave: out-of-fold predictions and scores, and the saved model.

    ``oof``: for every dataset row, in row order, its held-out prediction from the fold that held it out
    (tasks.py: a number, the probability of class 1, or a list of class probabilities). ``fold_scores``:
    the job's metric of each fold's part of ``oof``, which equal the study's fold scores of that trial.
    ``predictions``: the saved model's predictions of every row, computed in the process that trained it
    before saving (``predict`` on the same rows must give exactly these). ``files``: what the executor
    wrote in the job's model_dir, relative to it; ``info``: what the fit on every row used (rounds, epochs).
    """

    model_type: str
    trial_number: int
    status: str = STATUS_OK
    oof: list[Any] = field(default_factory=list)
    fold_scores: list[float | None] = field(default_factory=list)
    predictions: list[Any] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> RefitResult:
        return cls(**obj)
