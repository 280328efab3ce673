"""A refit NN on disk, and its predictions of new rows (the nn model type's ModelType.predict).

A model directory holds (besides the core's model.json):

- ``nn_state.pt``: the net's parameters as a torch state dict of model.SurvivorQualityNet (``hidden.<l>.weight``
  [out, in], ``hidden.<l>.bias``, ``out.weight``, ``out.bias``; float32, CPU tensors), which
  ``SurvivorQualityNet(n_inputs, hidden_layers, n_outputs=n_outputs).load_state_dict`` takes;
- ``nn_model.json``: what predicting needs besides: the architecture (input width, hidden widths, output
  width), the task and its number of classes, the precision it was trained at, the epochs it was trained
  for, the regression target's standardisation (mean, std) and the preprocessing of the encoded rows
  (preprocess.Preprocessing's JSON), with the trial it is the refit of.

``predict(model_dir, X)`` takes rows encoded as the dataset's (data.FeatureSchema: float64, NaN where
missing, category codes), applies the saved preprocessing and the forward computation of training
(pack.forward, at the saved precision's operand rounding, without dropout) on the CPU, one thread, and
maps the outputs to predictions (heads.py). The refit computes its ``predictions`` (RefitResult) with this
very function on the saved files, in the worker, so predicting the same rows gives them exactly, on any
machine whose torch computes float32 matmuls the same way. (The net itself was trained on the worker's
device: on a GPU its weights carry the GPU's rounding; the predictions of the saved weights are the CPU's.)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from watcher_plugins.model_files import read_versioned_json
from watcher_plugins.nn_batch import heads
from watcher_plugins.nn_batch.preprocess import Preprocessing
from watcher_plugins.tasks import TASKS

STATE_FILE = "nn_state.pt"
META_FILE = "nn_model.json"
FORMAT_VERSION = 1
ARCHITECTURE = "SurvivorQualityNet"


def state_dict(params: Sequence[Any]) -> dict[str, Any]:
    """The state dict of a SurvivorQualityNet from a fit's parameters (TorchFit.params: weight [in, out],
    bias [out] per layer), as float32 CPU tensors."""
    depth = len(params) // 2 - 1
    names = [f"hidden.{layer}" for layer in range(depth)] + ["out"]
    state = {}
    for layer, name in enumerate(names):
        state[f"{name}.weight"] = params[2 * layer].detach().T.contiguous().float().cpu().clone()
        state[f"{name}.bias"] = params[2 * layer + 1].detach().float().cpu().clone()
    return state


def save(model_dir: Path, params: Sequence[Any], meta: dict[str, Any]) -> list[str]:
    """Write nn_state.pt and nn_model.json (``meta``, with the format's version) into ``model_dir``;
    returns the files, relative to it."""
    import torch

    model_dir = Path(model_dir)
    tmp = model_dir / f".{STATE_FILE}.{os.getpid()}"
    torch.save(state_dict(params), tmp)
    os.replace(tmp, model_dir / STATE_FILE)
    tmp = model_dir / f".{META_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE, **meta}, indent=2)
                   + "\n", encoding="utf-8")
    os.replace(tmp, model_dir / META_FILE)
    return [STATE_FILE, META_FILE]


def read_meta(model_dir: Path) -> dict[str, Any]:
    """nn_model.json of ``model_dir``; a ValueError says what is wrong with a missing or foreign one."""
    path = Path(model_dir) / META_FILE
    meta = read_versioned_json(path, "the NN model's description", FORMAT_VERSION)
    missing = [key for key in ("task", "n_inputs", "hidden_layers", "n_outputs", "precision", "target_mean",
                               "target_std", "preprocessing") if key not in meta]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}")
    if meta["task"] not in TASKS:
        raise ValueError(f"{path}: task {meta['task']!r}: expected one of {', '.join(TASKS)}")
    return meta


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread (restored afterwards): a float32 sum split over threads would make the
    predictions depend on the thread count of the process that computes them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load(model_dir: Path) -> tuple[dict[str, Any], Preprocessing, list[Any]]:
    """(nn_model.json, the preprocessing, the parameters as TorchFit holds them: weight [in, out], bias)."""
    import torch

    meta = read_meta(model_dir)
    preprocessing = Preprocessing.from_json(meta["preprocessing"])
    state = torch.load(Path(model_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    depth = len(meta["hidden_layers"])
    names = [f"hidden.{layer}" for layer in range(depth)] + ["out"]
    try:
        params = [t for name in names for t in (state[f"{name}.weight"].T.contiguous(), state[f"{name}.bias"])]
    except KeyError as exc:
        raise ValueError(f"{Path(model_dir) / STATE_FILE}: no tensor {exc.args[0]!r}") from None
    widths = [int(meta["n_inputs"]), *meta["hidden_layers"], int(meta["n_outputs"])]
    shapes = [tuple(p.shape) for p in params]
    expected = [s for a, b in zip(widths[:-1], widths[1:]) for s in ((a, b), (b,))]
    if shapes != expected or preprocessing.n_inputs != widths[0]:
        raise ValueError(f"{Path(model_dir) / STATE_FILE}: tensor shapes {shapes} are not those of nn_model.json's "
                         f"architecture {widths}")
    return meta, preprocessing, params


def outputs(params: Sequence[Any], inputs: np.ndarray, precision: str) -> np.ndarray:
    """The net's float32 outputs [rows, n_outputs] on preprocessed inputs, without dropout, on the CPU,
    one thread: pack.forward, the computation the net trained with."""
    import torch

    from watcher_plugins.nn_batch.pack import forward

    with torch.no_grad(), one_thread():
        _, out = forward(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)), params, precision)
    return out.numpy()


def predict(model_dir: Path, X: np.ndarray) -> np.ndarray:
    """Predictions (tasks.py's shapes: [n] values or probabilities of class 1, [n, classes] probabilities)
    of rows ``X`` encoded as the training dataset's (module docstring)."""
    meta, preprocessing, params = load(model_dir)
    out = outputs(params, preprocessing.transform(np.asarray(X, dtype=np.float64)), meta["precision"])
    if out.shape[1] == 1:
        out = out[:, 0]
    return heads.predictions(out, meta["task"], float(meta["target_mean"]), float(meta["target_std"]))
