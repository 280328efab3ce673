"""A refit tree model on disk, and its predictions of new rows (the tree model types' ModelType.predict).

A model directory holds the library's own file (libraries.py: CatBoost ``model.cbm``, LightGBM
``model.txt``, XGBoost ``xgboost_model.json``; each loads with the library's own loader) and
``tree_model.json``, what predicting needs besides: the library, the task and its number of classes,
the encoding (encoding.py: the feature names, which are categorical, the z-scores applied before the
float32 cast, a regression target's z-score), the rounds trained and the trial. The core writes its own
``model.json`` in the same directory (the feature schema, which encodes new rows).

``predict(model_dir, X)`` takes rows encoded as the dataset's (data.FeatureSchema: float64, NaN where
missing, category codes) and predicts on the CPU; for the rows a refit trained on it gives exactly the
refit's ``predictions`` (RefitResult), which the refit computes with this very function.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from watcher_plugins.model_files import read_versioned_json
from watcher_plugins.records import TrialJob
from watcher_plugins.tree_parallel.encoding import TreeEncoding
from watcher_plugins.tree_parallel.libraries import TreeFitter, fitter_for

META_FILE = "tree_model.json"
FORMAT_VERSION = 1


def _library_version(model_type: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(model_type)
    except PackageNotFoundError:
        return None


def save(model_dir: Path, fitter: TreeFitter, model: Any, encoding: TreeEncoding, trial: TrialJob,
         rounds: int) -> list[str]:
    """Write ``model`` (the library's format) and tree_model.json into ``model_dir``; the files, relative to it."""
    files = fitter.save(model, str(model_dir))
    meta = {
        "format_version": FORMAT_VERSION,
        "library": fitter.model_type,
        "library_version": _library_version(fitter.model_type),
        "model_file": fitter.MODEL_FILE,
        "task": encoding.task,
        "n_classes": encoding.n_classes,
        "rounds": rounds,
        "trial_number": trial.trial_number,
        "params": trial.params,
        "metric": trial.metric,
        "encoding": encoding.to_json(),
    }
    tmp = model_dir / f".{META_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, model_dir / META_FILE)
    return [*files, META_FILE]


def read_meta(model_dir: Path) -> dict[str, Any]:
    """tree_model.json of ``model_dir``; a ValueError says what is wrong with a missing or foreign one."""
    path = Path(model_dir) / META_FILE
    meta = read_versioned_json(path, "the tree model's description", FORMAT_VERSION)
    return meta


def load(model_dir: Path) -> tuple[TreeFitter, Any, TreeEncoding]:
    """The library's fitter, the model read with the library's own loader, and the encoding."""
    meta = read_meta(model_dir)
    fitter = fitter_for(meta["library"])
    encoding = TreeEncoding.from_json(meta["encoding"])
    return fitter, fitter.load(str(model_dir), encoding), encoding


def predict(model_dir: Path, X: np.ndarray, threads: int | None = None) -> np.ndarray:
    """The saved model's predictions of rows ``X`` (float64 [rows, features], encoded as its dataset's), on
    the CPU, shaped as tasks.py says: regression [n] values, binary [n] the probability of class 1,
    multiclass [n, classes]. ``threads``: the library's threads (default: its own, every core)."""
    fitter, model, encoding = load(Path(model_dir))
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != encoding.n_features:
        raise ValueError(f"the model expects rows of {encoding.n_features} features "
                         f"({', '.join(encoding.feature_names)}), got an array of shape {X.shape}")
    return encoding.predictions(fitter.predict(model, encoding.features(X), encoding, threads))
