"""``watcher-agent predict``: a model that step 5 saved (``refit_best``) applied to the rows of a new file.

A model directory, ``OUTPUT_DIR/models/<model_type>/``, holds what the model type's executor wrote
(Executor.refit: its library's own format) and ``model.json``, written by the core (``write_model_json``)::

    {"format_version": 1, "model_type", "executor", "trial_number", "params", "metric", "task", "classes",
     "feature_schema": data.FeatureSchema.to_json(), "fold_scores", "files", "info",
     "watcher_plugins_version", "plugin"}

``plugin`` (optional) names the plugin that declares the model type and the package that installs it
(``{"name", "package", "version"}``), so that a machine without it is told what to install.

``predict`` reads model.json, finds the model type among the registered ones (its ``ModelType.predict``),
reads the file with the readers of the training data and encodes it with the saved feature schema
(data.load_features: the same checks, every problem at once), and writes CSV in the input's row order:
regression one column ``prediction``; classification ``prediction`` (the class label) and
``probability_<label>`` for each class. Floats are written as Python's repr, so that they read back to the
same bits. Bad input (a model directory that is missing or damaged, a model type not installed, a file
with a missing column or a text value in a numeric column) is exit 2 with a line per problem, and nothing
is written: ``--out`` is written under a temporary name and renamed into place.

Only numpy and the data readers are imported here (the plugin manager when a model is predicted with), so
that a plugin's predict function may import it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from watcher_plugins import __version__
from watcher_plugins.errors import DataError, WatcherPluginError
from watcher_plugins.tasks import BINARY, METRICS, MULTICLASS, REGRESSION, TASKS

MODEL_FILE = "model.json"
FORMAT_VERSION = 1
PROG = "watcher-agent predict"
#: What predict reads a model directory's model.json for, and each key's JSON type.
_REQUIRED: dict[str, tuple[type, ...]] = {
    "model_type": (str,), "executor": (str,), "trial_number": (int,), "params": (dict,), "metric": (str,),
    "task": (str,), "classes": (list,), "feature_schema": (dict,), "fold_scores": (list,), "files": (list,),
    "info": (dict,), "watcher_plugins_version": (str,),
}
_AUTO = object()  # write_model_json's plugin: looked up from the registered model types


class ModelDirError(WatcherPluginError):
    """A model directory that is missing, damaged, of another format, or whose model type is not installed.
    One line per problem."""

    exit_code = 2


@dataclass(frozen=True)
class SavedModel:
    """model.json, checked: ``schema`` is its feature schema (data.FeatureSchema)."""

    path: Path
    model_type: str
    executor: str
    trial_number: int
    params: dict[str, Any]
    metric: str
    task: str
    classes: tuple[str, ...]
    schema: Any  # data.FeatureSchema
    fold_scores: list[float | None]
    files: list[str]
    info: dict[str, Any]
    watcher_plugins_version: str
    plugin: dict[str, Any] | None = field(default=None)


def plugin_of(model_type: str, pm=None) -> dict[str, Any] | None:
    """The plugin that declares ``model_type`` among ``pm``'s registrations (default: the process's plugin
    manager): its name and the installed package that provides it, with its version; None if no
    registration declares it."""
    if pm is None:
        from watcher_plugins.manager import get_plugin_manager

        pm = get_plugin_manager()
    for impl in pm.hook.watcher_executors.get_hookimpls():
        registrations = list(impl.function() or ())
        if not any(declared.name == model_type for reg in registrations for declared in reg.declares):
            continue
        module = getattr(impl.plugin, "__name__", type(impl.plugin).__module__)
        package, version = _distribution_of(module.partition(".")[0])
        return {"name": impl.plugin_name, "module": module, "package": package, "version": version}
    return None


def _distribution_of(top_level: str) -> tuple[str | None, str | None]:
    from importlib import metadata

    try:
        dists = metadata.packages_distributions().get(top_level) or []
        if not dists:
            return None, None
        return dists[0], metadata.version(dists[0])
    except Exception:  # metadata of a broken install: the model still saves, without the package's name
        return None, None


def write_model_json(model_dir: str | Path, *, model_type: str, executor: str, trial_number: int,
                     params: Mapping[str, Any], metric: str, task: str, classes: Sequence[str],
                     feature_schema: Any, fold_scores: Sequence[float | None], files: Sequence[str],
                     info: Mapping[str, Any], plugin: Any = _AUTO) -> Path:
    """Write ``model_dir/model.json`` (through a temporary file). ``feature_schema``: a data.FeatureSchema
    or its to_json(). ``plugin``: who declares the model type (plugin_of, by default looked up from the
    registered plugins; None: unknown)."""
    if hasattr(feature_schema, "to_json"):
        feature_schema = feature_schema.to_json()
    if plugin is _AUTO:
        try:
            plugin = plugin_of(model_type)
        except WatcherPluginError:
            plugin = None
    obj = {
        "format_version": FORMAT_VERSION, "model_type": model_type, "executor": executor,
        "trial_number": int(trial_number), "params": dict(params), "metric": metric, "task": task,
        "classes": [str(c) for c in classes], "feature_schema": dict(feature_schema),
        "fold_scores": [None if s is None else float(s) for s in fold_scores], "files": [str(f) for f in files],
        "info": dict(info), "watcher_plugins_version": __version__, "plugin": plugin,
    }
    path = Path(model_dir) / MODEL_FILE
    tmp = path.with_name(f".{MODEL_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_model_json(model_dir: str | Path) -> SavedModel:
    """model.json of a model directory, checked; a ModelDirError says what is wrong, a line per problem,
    each naming the path."""
    from watcher_plugins.data import FeatureSchema

    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not model_dir.exists():
        raise ModelDirError(f"{model_dir}: no such model directory (expected OUTPUT_DIR/models/MODEL_TYPE, "
                            "written by compare_models with refit_best)")
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a directory: --model takes a model directory, "
                            "OUTPUT_DIR/models/MODEL_TYPE")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelDirError(f"{model_dir}: no {MODEL_FILE}: not a model directory written by compare_models "
                            "(expected OUTPUT_DIR/models/MODEL_TYPE)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{path}: cannot read it: {exc}") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ModelDirError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ModelDirError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        saved_by = obj.get("watcher_plugins_version")
        raise ModelDirError(f"{path}: format_version {version!r}: this watcher_plugins ({__version__}) reads "
                            f"format {FORMAT_VERSION}" + (f"; the model was saved by watcher_plugins {saved_by}"
                                                          if isinstance(saved_by, str) else ""))
    problems = []
    for key, types in _REQUIRED.items():
        if key not in obj:
            problems.append(f"{path}: missing key {key!r}")
        elif not isinstance(obj[key], types) or (types == (int,) and isinstance(obj[key], bool)):
            problems.append(f"{path}: {key!r} is {json.dumps(obj[key])[:60]}: expected a JSON "
                            f"{_JSON_TYPE[types[0]]}")
    if problems:
        raise ModelDirError("\n".join(problems))
    if obj["metric"] not in METRICS:
        problems.append(f"{path}: metric {obj['metric']!r}: expected one of {', '.join(METRICS)}")
    if obj["task"] not in TASKS:
        problems.append(f"{path}: task {obj['task']!r}: expected one of {', '.join(TASKS)}")
    if not all(isinstance(c, str) for c in obj["classes"]):
        problems.append(f"{path}: 'classes' must be a list of labels")
    if not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in obj["fold_scores"]):
        problems.append(f"{path}: 'fold_scores' must be a list of numbers (null for a failed fold)")
    plugin = obj.get("plugin")
    if plugin is not None and not isinstance(plugin, dict):
        problems.append(f"{path}: 'plugin' is {json.dumps(plugin)[:60]}: expected a JSON object or null")
    for name in obj["files"]:
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{path}: 'files' holds {json.dumps(name)[:60]}: expected paths inside the model "
                            "directory")
        elif not (model_dir / name).is_file():
            problems.append(f"{model_dir / name}: missing: model.json lists it among the model's files")
    schema = None
    try:
        schema = FeatureSchema.from_json(obj["feature_schema"])
    except DataError as exc:
        problems.append(f"{path}: {exc}")
    if schema is not None and obj["task"] in TASKS:
        if schema.task != obj["task"]:
            problems.append(f"{path}: task {obj['task']!r}, but its feature_schema's task is {schema.task!r}")
        if list(schema.classes) != obj["classes"]:
            problems.append(f"{path}: classes {obj['classes']}, but its feature_schema's are {list(schema.classes)}")
        if obj["task"] != REGRESSION and len(obj["classes"]) < 2:
            problems.append(f"{path}: a {obj['task']} model needs at least 2 classes, got {obj['classes']}")
    if problems:
        raise ModelDirError("\n".join(problems))
    return SavedModel(path=path, model_type=obj["model_type"], executor=obj["executor"],
                      trial_number=obj["trial_number"], params=obj["params"], metric=obj["metric"],
                      task=obj["task"], classes=tuple(obj["classes"]), schema=schema,
                      fold_scores=obj["fold_scores"], files=obj["files"], info=obj["info"],
                      watcher_plugins_version=obj["watcher_plugins_version"], plugin=plugin)


_JSON_TYPE = {str: "string", int: "integer", dict: "object", list: "array"}


def _model_type(saved: SavedModel, pm=None):
    """The registered ModelType that saved the model, or a ModelDirError saying what to install."""
    from watcher_plugins.manager import BLOCK_ENV, get_plugin_manager

    pm = pm or get_plugin_manager()
    declared = pm.get_model_types()
    model_type = declared.get(saved.model_type)
    where = saved.path.parent
    if model_type is None:
        plugin = saved.plugin or {}
        name, package = plugin.get("name"), plugin.get("package")
        blocked = {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
        saved_by = (f"its plugin {name!r}" if name else "the plugin that declares it") + (
            f" (package {package}{' ' + plugin['version'] if plugin.get('version') else ''})" if package else "")
        if name and (name in blocked or "*" in blocked):
            fix = f"{saved_by} is blocked here by {BLOCK_ENV}={os.environ.get(BLOCK_ENV)}"
        else:
            fix = f"{saved_by} is not installed here" + (f": pip install {package}" if package else "")
        raise ModelDirError(f"{where}: model type {saved.model_type!r} (executor {saved.executor!r}) is not "
                            f"registered: {fix}; registered model types: {', '.join(declared) or 'none'}")
    if model_type.predict is None:
        raise ModelDirError(f"{where}: model type {saved.model_type!r} cannot predict with a saved model: its "
                            "registration has no predict")
    return model_type


def predictions_of(saved: SavedModel, model_type, X: np.ndarray) -> np.ndarray:
    """``model_type.predict`` of the rows X, checked against the task's shape (tasks.py)."""
    where = saved.path.parent
    try:
        predictions = np.asarray(model_type.predict(where, X), dtype=np.float64)
    except ImportError as exc:
        raise ModelDirError(f"{where}: model type {saved.model_type!r} needs {exc.name or exc} to predict, which "
                            f"is not installed here") from None
    except WatcherPluginError:
        raise
    except Exception as exc:  # a plugin's predict failing: say whose, without a traceback
        raise WatcherPluginError(f"{where}: model type {saved.model_type!r} could not predict: "
                                 f"{type(exc).__name__}: {exc}") from exc
    n = X.shape[0]
    expected = (n, len(saved.classes)) if saved.task == MULTICLASS else (n,)
    if predictions.shape != expected:
        raise WatcherPluginError(f"model type {saved.model_type!r}'s predict returned an array of shape "
                                 f"{predictions.shape} for {n} rows: expected {expected} ({saved.task})")
    return predictions


def prediction_table(saved: SavedModel, predictions: np.ndarray) -> tuple[list[str], list[list[str]]]:
    """The CSV's header and rows: floats as repr. A binary row's label is class 1's where its probability
    is at least 0.5; a multiclass row's the most probable class (the first of ties), as tasks.accuracy."""
    if saved.task == REGRESSION:
        return ["prediction"], [[repr(float(v))] for v in predictions]
    classes = saved.classes
    if saved.task == BINARY:
        probabilities = np.column_stack([1.0 - predictions, predictions])
        chosen = (predictions >= 0.5).astype(np.int64)
    else:
        probabilities = predictions
        chosen = np.argmax(predictions, axis=1)
    header = ["prediction", *(f"probability_{label}" for label in classes)]
    rows = [[classes[int(c)], *(repr(float(p)) for p in row)] for c, row in zip(chosen, probabilities)]
    return header, rows


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ModelDirError(f"--out {out}: is a directory: expected a file to write")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ModelDirError(f"--out {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ModelDirError(f"--out {out}: the directory {parent} is not writable")


def _write_atomically(out: Path, text: str) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def predict_file(model: str | Path, data: str | Path, out: str | Path | None = None, fmt: str | None = None, *,
                 stdout: TextIO | None = None, stderr: TextIO | None = None, pm=None) -> int:
    """The predict command: returns the number of rows written. Raises ModelDirError or DataError (bad
    input, nothing written) or another WatcherPluginError."""
    from watcher_plugins.data import DataWarning, load_features

    stderr = stderr or sys.stderr
    saved = read_model_json(model)
    model_type = _model_type(saved, pm)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _check_out(out_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        X = load_features(Path(data), saved.schema, fmt)
    for w in caught:
        if issubclass(w.category, DataWarning):
            print(f"watcher-agent: warning: {w.message}", file=stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    predictions = predictions_of(saved, model_type, X)
    text = _csv_text(*prediction_table(saved, predictions))
    if out_path is None:
        (stdout or sys.stdout).write(text)
    else:
        _write_atomically(out_path, text)
    return int(X.shape[0])


def build_parser() -> argparse.ArgumentParser:
    from watcher_plugins.data import DATA_FORMATS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Predict the rows of a data file with a model that step 5 (compare_models) saved: "
                    "refit_best writes one per model type under OUTPUT_DIR/models/MODEL_TYPE. The file needs "
                    "the feature columns the model was trained on (the target column may be absent; other "
                    "columns are ignored) and is checked as the training data was; a category the model "
                    "never saw is read as missing, with a warning.",
        epilog="Output (CSV, the input's row order, floats as Python's repr): regression: a column "
               "'prediction'; classification: 'prediction' (the class label), then 'probability_<label>' per "
               "class. Exit codes: 0 done, 1 the prediction failed, 2 bad input (the model directory, the "
               "model type not installed, the data file: one line per problem, nothing written), "
               "130 interrupted.",
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the model directory, OUTPUT_DIR/models/MODEL_TYPE")
    parser.add_argument("--data", required=True, metavar="FILE", help="the rows to predict (CSV, parquet, JSON "
                        "records or npz, by its suffix or --format)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="write the predictions here (default: standard output)")
    parser.add_argument("--format", default=None, choices=DATA_FORMATS, metavar="FMT",
                        help=f"the data file's format, where its suffix does not say: {', '.join(DATA_FORMATS)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``watcher-agent predict ...`` (argv without the word "predict")."""
    args = build_parser().parse_args(argv)
    try:
        rows = predict_file(args.model, args.data, args.out, args.format)
    except WatcherPluginError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"watcher-agent: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("watcher-agent: interrupted; nothing written", file=sys.stderr)
        return 130
    if args.out is not None:
        print(f"watcher-agent: wrote {rows} predictions to {args.out}", file=sys.stderr)
    return 0


__all__ = ["FORMAT_VERSION", "MODEL_FILE", "ModelDirError", "SavedModel", "build_parser", "main", "plugin_of",
           "predict_file", "prediction_table", "predictions_of", "read_model_json", "write_model_json"]
