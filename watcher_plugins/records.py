"""Records that cross process boundaries: trial jobs and their per-fold results.

They are plain dataclasses with JSON round-trips, because they travel over pipes to worker
processes (the NN worker's JSON lines, the tree pool's queues).
"""

from __future__ import annotations

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

    @classmethod
    def from_param(cls, data: dict) -> DataRef:
        return cls(**data)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def key(self) -> str:
        """A stable identity, used to cache the loaded dataset in a worker."""
        if self.embedded:
            return f"embedded:{self.embedded}:{self.rows}"
        return f"file:{self.path}:{self.target}:{self.format}"


@dataclass(frozen=True)
class TrialJob:
    """One Optuna trial of one model type: train it on every fold of the k-fold split."""

    model_type: str
    trial_number: int
    params: dict[str, Any]
    data: DataRef
    folds: int
    seed: int

    def to_json(self) -> dict:
        out = asdict(self)
        out["data"] = self.data.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict) -> TrialJob:
        return cls(**{**obj, "data": DataRef(**obj["data"])})


@dataclass
class FoldResult:
    """The outcome of one fold of one trial. ``r2`` is None unless status is "ok"."""

    trial_number: int
    fold_idx: int
    model_type: str
    r2: float | None
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
