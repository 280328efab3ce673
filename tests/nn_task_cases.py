"""A user's kind of table for the NN's tests of #20: CSV files with empty cells and NA markers in numeric
columns, a text column with a rare category and empty cells, and a regression (offset 2e7), binary or
3-class target. Shared by test_nn_preprocess.py, test_nn_classification.py and test_nn_refit.py."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from watcher_plugins.records import DataRef

TASKS = ("regression", "binary", "multiclass")
#: The metric each task's fits are scored by in these tests.
METRIC = {"regression": "r2", "binary": "logloss", "multiclass": "logloss"}
COLOURS = ["red", "green", "blue", "violet"]


def write_table(path: Path, task: str, rows: int = 300, seed: int = 0) -> Path:
    """x0..x3 (x1: 12% empty cells, x2: an "NA" every 37th row), colour (violet rare, 5% empty) and the
    target, written as a CSV file."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 4))
    colour = rng.choice(COLOURS, size=rows, p=[0.4, 0.3, 0.25, 0.05])
    signal = X[:, 0] - 0.5 * X[:, 1] + (colour == "red") * 1.0 - (colour == "blue") * 0.7
    noisy = signal + 0.5 * rng.normal(size=rows)
    if task == "regression":
        target = [repr(float(v)) for v in 2e7 + 3.0 * signal + 0.3 * rng.normal(size=rows)]
    elif task == "binary":
        target = ["yes" if v > 0 else "no" for v in noisy]
    else:
        target = np.where(noisy < -0.5, "low", np.where(noisy < 0.5, "mid", "high")).tolist()
    x1_missing = rng.random(rows) < 0.12
    colour_missing = rng.random(rows) < 0.05
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x0", "x1", "x2", "x3", "colour", "target"])
        for i in range(rows):
            writer.writerow([repr(float(X[i, 0])), "" if x1_missing[i] else repr(float(X[i, 1])),
                             "NA" if i % 37 == 0 else repr(float(X[i, 2])), repr(float(X[i, 3])),
                             "" if colour_missing[i] else colour[i], target[i]])
    return path


def table_ref(directory: Path, task: str, rows: int = 300, seed: int = 0) -> DataRef:
    path = write_table(Path(directory) / f"{task}-{rows}-{seed}.csv", task, rows, seed)
    return DataRef(path=str(path), target="target", format="csv")
