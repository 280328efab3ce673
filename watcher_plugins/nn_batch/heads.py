"""The NN's output head per task: how many outputs the net has and what its outputs mean.

- regression: one output, the standardised target: predictions are ``output * y_std + y_mean`` (float64);
- binary: one logit: the probability of class 1 is its sigmoid;
- multiclass: one logit per class: the probabilities are their softmax.

Outputs are the net's float32 values; predictions are float64, shaped as tasks.py says, computed here on
the host in numpy, by the worker for a fold's held-out rows and by saved.predict for new rows alike. The
losses that go with each head are pack.py's (TorchFit). Only numpy here.
"""

from __future__ import annotations

import numpy as np

from watcher_plugins.tasks import BINARY, MULTICLASS, REGRESSION


def n_outputs(task: str, n_classes: int) -> int:
    """The net's output width: one, or one logit per class (multiclass)."""
    return n_classes if task == MULTICLASS else 1


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64, without overflow for large |z|."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    ez = np.exp(z[~positive])
    out[~positive] = ez / (1.0 + ez)
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [n, C] logits in float64 (each row's largest logit subtracted first)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predictions(outputs: np.ndarray, task: str, y_mean: float = 0.0, y_std: float = 1.0) -> np.ndarray:
    """Predictions (tasks.py's shapes) from the net's outputs: [n] (regression, binary) or [n, C]."""
    if task == REGRESSION:
        return np.asarray(outputs, dtype=np.float64) * y_std + y_mean
    if task == BINARY:
        return sigmoid(outputs)
    if task == MULTICLASS:
        return softmax(outputs)
    raise ValueError(f"unknown task {task!r}")
