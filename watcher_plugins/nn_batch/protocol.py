"""The NN worker's JSON-lines protocol: request parsing and validation, and the reply lines.

One request per line on the worker's stdin, one reply per line on its stdout. schemas/
worker_protocol.schema.json is the same contract as a JSON Schema; this module checks requests by
hand so that the worker needs no jsonschema and every error names the JSON path and what was expected.
No torch here: the host process imports this module too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from watcher_plugins.data import DATA_FORMATS, TASK_CHOICES
from watcher_plugins.errors import ProtocolError
from watcher_plugins.records import DataRef, RefitJob, TrialJob
from watcher_plugins.schema_files import read_schema
from watcher_plugins.tasks import METRICS

#: The deepest network a job may ask for (the dropout hash keys a layer in 4 bits: dropout.py).
MAX_LAYERS = 16

#: Longest request line accepted, in bytes (a train_batch of thousands of jobs fits many times over).
MAX_LINE_BYTES = 4 * 1024 * 1024

COMMANDS = ("ping", "train", "train_batch", "refit", "shutdown")
#: A refit's out-of-fold predictions and predictions (npz: oof, predictions), left in its model_dir by the
#: worker for the host, which reads and removes it: arrays of every row are too long for a reply line.
REFIT_ARRAYS_FILE = ".nn-refit-arrays.npz"
#: A train_batch sends at most one progress line per this many seconds.
PROGRESS_INTERVAL_S = 1.0
STRATEGIES = ("auto", "serial", "streams", "fused")
PRECISIONS = ("fp32", "tf32", "bf16")

# Error codes of "error" lines (the worker keeps serving) and "fatal" lines (the worker exits).
E_LINE_TOO_LONG = "line_too_long"
E_INVALID_UTF8 = "invalid_utf8"
E_MALFORMED_JSON = "malformed_json"
E_INVALID_REQUEST = "invalid_request"
E_UNKNOWN_COMMAND = "unknown_command"
E_INVALID_JOB = "invalid_job"
E_INTERNAL = "internal_error"
FATAL_CUDA = "cuda_error"
FATAL_LEASE = "lease_unavailable"
FATAL_STARTUP = "startup_failed"


@dataclass(frozen=True)
class FitJob:
    """One fold of one trial, as the worker receives it."""

    trial_number: int
    fold_idx: int
    folds: int
    seed: int
    hidden_layers: tuple[int, ...]
    lr: float
    weight_decay: float
    dropout: float
    data: DataRef
    metric: str = "r2"  # what the fold is scored by (tasks.METRICS)

    @property
    def key(self) -> tuple[int, int]:
        return (self.trial_number, self.fold_idx)

    def to_json(self) -> dict:
        return {
            "trial_number": self.trial_number, "fold_idx": self.fold_idx, "folds": self.folds, "seed": self.seed,
            "params": {"hidden_layers": list(self.hidden_layers), "lr": self.lr,
                       "weight_decay": self.weight_decay, "dropout": self.dropout},
            "data": self.data.to_json(), "metric": self.metric,
        }


@dataclass(frozen=True)
class BatchSettings:
    """How a worker trains a batch; the executor sends its params with every train_batch."""

    n_concurrent: int | str
    strategy: str
    precision: str
    max_epochs: int
    patience: int
    vram_budget_fraction: float

    @classmethod
    def defaults(cls) -> BatchSettings:
        """What a request that leaves a setting out gets: the defaults schemas/worker_protocol.schema.json states."""
        properties = read_schema("worker_protocol.schema.json")["$defs"]["settings"]["properties"]
        return cls(**{name: spec["default"] for name, spec in properties.items()})

    def to_json(self) -> dict:
        return {"n_concurrent": self.n_concurrent, "strategy": self.strategy, "precision": self.precision,
                "max_epochs": self.max_epochs, "patience": self.patience,
                "vram_budget_fraction": self.vram_budget_fraction}


@dataclass
class Request:
    command: str
    jobs: list[FitJob] = field(default_factory=list)
    settings: BatchSettings = field(default_factory=lambda: BatchSettings.defaults())
    refit: RefitJob | None = None  # a refit request's job; ``jobs`` are then its trial's folds


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: Any) -> int | None:
    """``value`` as an integer where JSON Schema's "integer" takes it (2, and 2.0 as the schema allows;
    not true, 2.5 or an infinity), else None."""
    if _is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_number(value: Any) -> bool:
    """A finite number a float can hold (JSON allows integers of any size: 10**400 is none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _fail(code: str, path: str, expected: str, got: Any) -> ProtocolError:
    try:
        shown = json.dumps(got) if not isinstance(got, _Missing) else "nothing"
    except (TypeError, ValueError):  # from a Python caller: not JSON (a set), or an int too long to print
        shown = f"a value of type {type(got).__name__}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ProtocolError(code, f"{path}: expected {expected}, got {shown}")


class _Missing:
    pass


_MISSING = _Missing()


def _int(obj: dict, key: str, path: str, code: str, minimum: int = 0) -> int:
    value = obj.get(key, _MISSING)
    number = _as_int(value)
    if number is None or number < minimum:
        raise _fail(code, f"{path}.{key}", f"an integer >= {minimum}", value)
    return number


def parse_job(obj: Any, path: str = "$.job") -> FitJob:
    """Check one job object; raise ProtocolError("invalid_job") naming the first bad field."""
    code = E_INVALID_JOB
    if not isinstance(obj, dict):
        raise _fail(code, path, "a job object", obj)
    folds = _int(obj, "folds", path, code, minimum=2)
    fold_idx = _int(obj, "fold_idx", path, code)
    if fold_idx >= folds:
        raise _fail(code, f"{path}.fold_idx", f"an integer below folds ({folds})", fold_idx)
    params = obj.get("params", _MISSING)
    if not isinstance(params, dict):
        raise _fail(code, f"{path}.params", "an object with hidden_layers, lr, weight_decay, dropout", params)
    hidden = params.get("hidden_layers", _MISSING)
    # A tuple is a list to a Python caller (the executor's trial params); JSON has no tuples.
    widths = [_as_int(w) for w in hidden] if isinstance(hidden, (list, tuple)) else []
    if not 1 <= len(widths) <= MAX_LAYERS or not all(w is not None and 1 <= w <= 65536 for w in widths):
        raise _fail(code, f"{path}.params.hidden_layers",
                    f"a list of 1 to {MAX_LAYERS} integers in 1..65536", hidden)
    lr = params.get("lr", _MISSING)
    if not _is_number(lr) or lr <= 0:
        raise _fail(code, f"{path}.params.lr", "a number > 0", lr)
    weight_decay = params.get("weight_decay", 0.0)
    if not _is_number(weight_decay) or weight_decay < 0:
        raise _fail(code, f"{path}.params.weight_decay", "a number >= 0", weight_decay)
    dropout = params.get("dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise _fail(code, f"{path}.params.dropout", "a number in [0, 1)", dropout)
    metric = obj.get("metric", "r2")
    if metric not in METRICS:
        raise _fail(code, f"{path}.metric", f"one of {', '.join(METRICS)}", metric)
    return FitJob(
        trial_number=_int(obj, "trial_number", path, code), fold_idx=fold_idx, folds=folds,
        seed=_int(obj, "seed", path, code), hidden_layers=tuple(w for w in widths if w is not None), lr=float(lr),
        weight_decay=float(weight_decay), dropout=float(dropout), data=_parse_data(obj, f"{path}.data"),
        metric=metric,
    )


def _parse_data(job: dict, path: str) -> DataRef:
    """A job's data: {"embedded": "survivors"[, "rows": N]} or {"path": FILE[, "target": COLUMN][,
    "format": F]}, as the schema has them: a key of the other form is refused, never ignored."""
    code = E_INVALID_JOB
    data = job.get("data", _MISSING)
    if not isinstance(data, dict):
        raise _fail(code, path, '{"embedded": "survivors", "rows": N} or {"path": FILE, ...}', data)
    if ("embedded" in data) == ("path" in data):
        raise _fail(code, path, '{"embedded": "survivors", ...} or {"path": FILE, ...}, one of the two', data)
    if "embedded" in data:
        allowed: tuple[str, ...]
        allowed, form = ("embedded", "rows", "task"), '{"embedded": "survivors", "rows": N}'
    else:
        allowed = ("path", "target", "format", "categorical", "drop_missing_target", "task", "max_categories")
        form = '{"path": FILE, "target": COLUMN, "format": F} and the data options'
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise _fail(code, path, f"only the keys of {form}", data)
    if "embedded" in data and data["embedded"] != "survivors":
        raise _fail(code, f"{path}.embedded", '"survivors"', data["embedded"])
    if "path" in data and not (isinstance(data["path"], str) and data["path"]):
        raise _fail(code, f"{path}.path", "a file's path", data["path"])
    if "target" in data and not (isinstance(data["target"], str) and data["target"]):
        raise _fail(code, f"{path}.target", "a column name", data["target"])
    if "format" in data and data["format"] not in DATA_FORMATS:
        raise _fail(code, f"{path}.format", f"one of {', '.join(DATA_FORMATS)}", data["format"])
    if "categorical" in data:
        columns = data["categorical"]
        if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns) \
                or len(set(columns)) != len(columns):
            raise _fail(code, f"{path}.categorical", "a list of distinct column names", columns)
    if "drop_missing_target" in data and not isinstance(data["drop_missing_target"], bool):
        raise _fail(code, f"{path}.drop_missing_target", "true or false", data["drop_missing_target"])
    if "task" in data and data["task"] not in TASK_CHOICES:
        raise _fail(code, f"{path}.task", f"one of {', '.join(TASK_CHOICES)}", data["task"])
    if "max_categories" in data:
        data = {**data, "max_categories": _int(data, "max_categories", path, code, minimum=2)}
    rows = None
    if "rows" in data:
        rows = _int(data, "rows", path, code, minimum=2)
    return DataRef.from_param({**data, "rows": rows} if "embedded" in data else data)


def _parse_settings(obj: dict) -> BatchSettings:
    code = E_INVALID_REQUEST
    defaults = BatchSettings.defaults()
    n_concurrent = obj.get("n_concurrent", defaults.n_concurrent)
    if n_concurrent != "auto":
        number = _as_int(n_concurrent)
        if number is None or number < 1:
            raise _fail(code, "$.n_concurrent", '"auto" or an integer >= 1', n_concurrent)
        n_concurrent = number
    strategy = obj.get("strategy", defaults.strategy)
    if strategy not in STRATEGIES:
        raise _fail(code, "$.strategy", f"one of {', '.join(STRATEGIES)}", strategy)
    precision = obj.get("precision", defaults.precision)
    if precision not in PRECISIONS:
        raise _fail(code, "$.precision", f"one of {', '.join(PRECISIONS)}", precision)
    fraction = obj.get("vram_budget_fraction", defaults.vram_budget_fraction)
    if not _is_number(fraction) or not 0 < fraction <= 1:
        raise _fail(code, "$.vram_budget_fraction", "a number in (0, 1]", fraction)
    return BatchSettings(
        n_concurrent=n_concurrent, strategy=strategy, precision=precision,
        max_epochs=_int(obj, "max_epochs", "$", code, 1) if "max_epochs" in obj else defaults.max_epochs,
        patience=_int(obj, "patience", "$", code, 1) if "patience" in obj else defaults.patience,
        vram_budget_fraction=float(fraction),
    )


def parse_request(raw: bytes) -> Request:
    """Decode and check one request line (without its newline). Raise ProtocolError with a code."""
    if len(raw) > MAX_LINE_BYTES:
        raise ProtocolError(E_LINE_TOO_LONG, f"request line of {len(raw)} bytes: the limit is {MAX_LINE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(E_INVALID_UTF8, f"request line is not UTF-8: byte {exc.start} is invalid") from None
    if not text.strip():
        raise ProtocolError(E_MALFORMED_JSON, "request line is empty: expected a JSON object with a \"command\"")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(E_MALFORMED_JSON, f"request line is not JSON: {exc.msg} at column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # an integer too long for Python; arrays nested too deep
        raise ProtocolError(E_MALFORMED_JSON, f"request line is not JSON this worker can read: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
        raise _fail(E_INVALID_REQUEST, "$.command", f"an object with a \"command\": one of {', '.join(COMMANDS)}",
                    obj.get("command", _MISSING) if isinstance(obj, dict) else obj)
    command = obj["command"]
    if command not in COMMANDS:
        raise ProtocolError(E_UNKNOWN_COMMAND, f"$.command: unknown command {command!r}: expected one of "
                                               f"{', '.join(COMMANDS)}")
    if command == "train":
        return Request(command, [parse_job(obj.get("job", _MISSING))], _parse_settings(obj))
    if command == "train_batch":
        jobs = obj.get("jobs", _MISSING)
        if not isinstance(jobs, list) or not jobs:
            raise _fail(E_INVALID_JOB, "$.jobs", "a non-empty list of jobs", jobs)
        parsed = [parse_job(job, f"$.jobs[{i}]") for i, job in enumerate(jobs)]
        keys = [job.key for job in parsed]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ProtocolError(E_INVALID_JOB, f"$.jobs: trial {dup[0]} fold {dup[1]} appears more than once")
        return Request(command, parsed, _parse_settings(obj))
    if command == "refit":
        refit, fits = parse_refit(obj.get("job", _MISSING))
        return Request(command, fits, _parse_settings(obj), refit)
    return Request(command)


def parse_refit(obj: Any, path: str = "$.job") -> tuple[RefitJob, list[FitJob]]:
    """Check a refit job (records.RefitJob: {"trial": TrialJob, "model_dir", "fold_info"}); return it
    with its trial's folds as FitJobs. ProtocolError("invalid_job") names the first bad field."""
    code = E_INVALID_JOB
    if not isinstance(obj, dict):
        raise _fail(code, path, 'a refit job: {"trial": {...}, "model_dir": DIR, "fold_info": [...]}', obj)
    trial = obj.get("trial", _MISSING)
    if not isinstance(trial, dict):
        raise _fail(code, f"{path}.trial", "a trial job object", trial)
    if trial.get("model_type") != "nn":
        raise _fail(code, f"{path}.trial.model_type", '"nn"', trial.get("model_type", _MISSING))
    folds = _int(trial, "folds", f"{path}.trial", code, minimum=2)
    fits = [parse_job({"trial_number": trial.get("trial_number", _MISSING), "fold_idx": fold, "folds": folds,
                       "seed": trial.get("seed", _MISSING), "params": trial.get("params", _MISSING),
                       "data": trial.get("data", _MISSING), "metric": trial.get("metric", "r2")}, f"{path}.trial")
            for fold in range(folds)]
    model_dir = obj.get("model_dir", _MISSING)
    if not isinstance(model_dir, str) or not model_dir:
        raise _fail(code, f"{path}.model_dir", "a directory's path", model_dir)
    fold_info = obj.get("fold_info", [])
    if not isinstance(fold_info, list) or not all(isinstance(info, dict) for info in fold_info):
        raise _fail(code, f"{path}.fold_info", "a list of objects (the study's fold infos)", fold_info)
    first = fits[0]
    job = TrialJob(model_type="nn", trial_number=first.trial_number, params=dict(trial["params"]), data=first.data,
                   folds=folds, seed=first.seed, metric=first.metric)
    return RefitJob(job, model_dir, list(fold_info)), fits


# ---- reply lines -----------------------------------------------------------------------------------

def error_line(code: str, message: str) -> dict:
    return {"event": "error", "status": "error", "code": code, "message": message}


def progress_line(fits_done: int, fits: int, model_epochs: int, fraction_done: float) -> dict:
    """How far a train_batch has come: fits finished of the batch's, model-epochs run, and the estimated
    share of the batch's work done (batch.ProgressMeter). At most one per PROGRESS_INTERVAL_S."""
    return {"event": "progress", "status": "ok", "fits_done": fits_done, "fits": fits,
            "model_epochs": model_epochs, "fraction_done": fraction_done}


def fatal_line(code: str, message: str) -> dict:
    return {"event": "fatal", "status": "fatal", "code": code, "message": message}


def encode(reply: dict) -> bytes:
    # allow_nan=False: a NaN must never reach the host as invalid JSON; results carry score None instead.
    return (json.dumps(reply, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
