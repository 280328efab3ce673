"""Classification fits (#20): a binary fit has one logit (sigmoid, binary cross-entropy), a 3-class fit
one logit per class (softmax cross-entropy); each computes what a plain nn.Sequential + torch.optim.Adam
computes with torch's losses, and, as a regression fit, gives the same bits alone, beside other fits in
a pack, through serial, streams and fused, and at any n_concurrent_nn (the style of
test_nn_invariance.py). Data: nn_task_cases' tables (missing cells, a text column). CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nn_task_cases import table_ref
from torch import nn

from watcher_plugins import tasks as metrics
from watcher_plugins.nn_batch.batch import BatchRunner
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.dropout import dropout_mask, fit_key
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.model import initial_parameters
from watcher_plugins.nn_batch.pack import TorchPack, new_pack
from watcher_plugins.nn_batch.protocol import BatchSettings, FitJob
from watcher_plugins.nn_batch.serial import SerialTrainer
from watcher_plugins.nn_batch.streams import StreamsTrainer
from watcher_plugins.nn_batch.training import FitTask, TrainSettings, precision_context
from watcher_plugins.records import STATUS_FAIL, STATUS_OK

CPU = torch.device("cpu")
FOLDS, SEED = 3, 11
SETTINGS = TrainSettings(max_epochs=30, patience=5)
#: (trial, fold, hidden_layers, lr, weight_decay, dropout)
SPECS = [
    (0, 0, [32, 16], 1e-2, 0.0, 0.0),
    (1, 1, [64, 32], 5e-3, 1e-4, 0.2),
    (2, 2, [16], 2e-2, 0.0, 0.1),
    (3, 0, [48, 24, 12], 1e-2, 1e-5, 0.0),
]
METRIC = {"binary": "logloss", "multiclass": "logloss"}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("classification")
    return {task: table_ref(directory, task) for task in ("binary", "multiclass")}


@pytest.fixture(scope="module")
def cache():
    return DeviceDatasetCache(CPU)


def job(ref, spec, metric: str) -> FitJob:
    trial, fold, hidden, lr, wd, p = spec
    return FitJob(trial, fold, FOLDS, SEED, tuple(hidden), lr, wd, p, ref, metric)


def fit_tasks(cache, ref, specs, metric: str) -> list[FitTask]:
    jobs = [job(ref, spec, metric) for spec in specs]
    return [FitTask.build(j, cache.for_fold(ref, j.folds, j.seed, j.fold_idx)) for j in jobs]


def bits(outcome) -> tuple:
    """A fit's outcome, compared exactly: status, score, best epoch, epochs, its held-out predictions' bytes."""
    predictions = outcome.predictions.tobytes() if outcome.predictions is not None else None
    return outcome.status, outcome.score, outcome.best_epoch, outcome.epochs, predictions


def train_pack(tasks, settings) -> dict:
    got = {}
    with precision_context(settings.precision, CPU):
        FusedTrainer(settings, CPU).run_pack(new_pack(tasks, settings, CPU), lambda o: got.__setitem__(o.key, bits(o)))
    return got


@pytest.fixture(scope="module")
def alone(cache, refs):
    """Each fit of SPECS on each task, trained in a pack of its own, by (task, precision)."""
    return {(task, precision): {k: v for t in fit_tasks(cache, refs[task], SPECS, METRIC[task])
                                for k, v in train_pack([t], TrainSettings(30, 5, precision)).items()}
            for task in ("binary", "multiclass") for precision in ("fp32", "bf16")}


def plain_fit(task: FitTask, settings: TrainSettings) -> tuple[float, int]:
    """(log loss, best epoch) of the fit trained by a plain nn.Sequential, torch.optim.Adam and torch's
    losses (F.binary_cross_entropy_with_logits of one logit, F.cross_entropy of one per class, means over
    the rows), training.py's semantics written out as test_nn_trainers' regression reference has them."""
    data, fit_job, rows = task.data, task.job, task.rows
    widths = [data.n_features, *fit_job.hidden_layers]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], data.n_outputs))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        init = initial_parameters(data.n_features, fit_job.hidden_layers, task.init_seed, data.n_outputs)
        for module, (weight, bias) in zip(linears, init):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=fit_job.lr, weight_decay=fit_job.weight_decay)
    key = fit_key(task.init_seed)

    def forward(x, epoch=None):
        for i, module in enumerate(model):
            x = module(x)
            if epoch is not None and fit_job.dropout > 0 and isinstance(module, nn.ReLU):
                x = x * dropout_mask(key, epoch, i // 2, rows.train_idx, x.shape[1], fit_job.dropout)
        return x.squeeze(-1) if data.n_outputs == 1 else x

    def loss(out, idx):
        if data.task == "binary":
            return F.binary_cross_entropy_with_logits(out, data.y[idx])
        return F.cross_entropy(out, data.y_codes[idx])

    best_loss, best_epoch, best = float("inf"), -1, None
    for epoch in range(settings.max_epochs):
        with torch.no_grad():
            out_val = forward(data.X[rows.val_idx])
        val_loss = float(loss(out_val, rows.val_idx))
        if val_loss < best_loss:
            best_loss, best_epoch, best = val_loss, epoch, out_val.clone()
        if epoch - best_epoch >= settings.patience or epoch == settings.max_epochs - 1:
            break
        optimizer.zero_grad()
        loss(forward(data.X[rows.train_idx], epoch), rows.train_idx).backward()
        optimizer.step()
    score = metrics.score("logloss", data.task, data.y_host[rows.val_idx_host], data.predictions(best.numpy()))
    return score, best_epoch


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_a_classification_fit_computes_what_a_plain_sequential_with_torchs_loss_computes(cache, refs, task):
    tasks = fit_tasks(cache, refs[task], SPECS, METRIC[task])
    got = {}
    SerialTrainer(SETTINGS, CPU).train(tasks, 1, lambda o: got.__setitem__(o.key, o))
    for fit in tasks:
        score, best_epoch = plain_fit(fit, SETTINGS)
        outcome = got[fit.key]
        assert outcome.status == STATUS_OK and outcome.best_epoch == best_epoch, fit.key
        assert abs(outcome.score - score) < 1e-5, (fit.key, outcome.score, score)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_a_classification_fits_score_is_its_metric_of_its_probabilities(cache, refs, task):
    n_classes = 2 if task == "binary" else 3
    for metric in ("logloss", "auc", "accuracy"):
        (fit,) = fit_tasks(cache, refs[task], SPECS[:1], metric)
        got: dict = {}
        SerialTrainer(SETTINGS, CPU).train([fit], 1, lambda o, got=got: got.__setitem__(o.key, o))
        outcome = got[fit.key]
        p = outcome.predictions
        assert p.shape == ((fit.rows.n_val,) if task == "binary" else (fit.rows.n_val, n_classes))
        assert np.all((p >= 0) & (p <= 1))
        if task == "multiclass":
            assert np.allclose(p.sum(axis=1), 1.0)
        y_val = fit.data.y_host[fit.rows.val_idx_host]
        assert outcome.score == metrics.score(metric, task, y_val, p)
    assert outcome.score > 1.2 / n_classes  # the last metric, accuracy: better than chance


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_every_classification_fit_alone_is_a_real_fit(alone, task, precision):
    for key, (status, score, best_epoch, epochs, _) in alone[(task, precision)].items():
        assert status == STATUS_OK and np.isfinite(score) and best_epoch > 0 and epochs > best_epoch, key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_a_classification_fit_gives_its_own_bits_beside_other_fits(cache, refs, alone, task, precision):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    settings = TrainSettings(30, 5, precision)
    for target in fit_tasks(cache, refs[task], SPECS, METRIC[task]):
        depth = len(target.job.hidden_layers)
        fold = target.job.fold_idx  # a pack holds one dataset: this fold's
        mates = [(100 + i, fold, [int(w) for w in rng.integers(8, 80, size=depth)], float(10 ** rng.uniform(-3, -1.5)),
                  float(rng.choice([0.0, 1e-4])), float(rng.choice([0.0, 0.2]))) for i in range(5)]
        mates.append((99, fold, [w + 16 for w in target.job.hidden_layers], 1e-2, 0.0, 0.2))  # wider in every layer
        tasks = fit_tasks(cache, refs[task], mates, METRIC[task])
        tasks.insert(int(rng.integers(0, len(tasks) + 1)), target)
        pack = new_pack(tasks, settings, CPU)
        assert isinstance(pack, TorchPack)
        assert train_pack(tasks, settings)[target.key] == alone[(task, precision)][target.key], (seed, target.key)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_serial_streams_and_fused_give_a_classification_fit_the_same_bits(cache, refs, alone, task):
    for trainer in (SerialTrainer(SETTINGS, CPU), StreamsTrainer(SETTINGS, CPU), FusedTrainer(SETTINGS, CPU)):
        got = {}
        trainer.train(fit_tasks(cache, refs[task], SPECS, METRIC[task]), 8,
                      lambda o, got=got: got.__setitem__(o.key, bits(o)))
        assert got == alone[(task, "fp32")], trainer.name


def test_n_concurrent_nn_changes_no_bit_of_a_mixed_batch_of_tasks(cache, refs, alone):
    """Binary and 3-class fits (and their folds' datasets) in one batch through the worker's batch
    runner: each gets its bits alone, at n_concurrent 1, 3 and auto."""
    # the 3-class fits as trials 10..13: the batch runner keys by (trial, fold)
    specs = {"binary": SPECS, "multiclass": [(10 + spec[0], *spec[1:]) for spec in SPECS]}
    jobs = [job(refs[task], spec, METRIC[task]) for task in ("binary", "multiclass") for spec in specs[task]]
    want = dict(alone[("binary", "fp32")])
    for fit in fit_tasks(cache, refs["multiclass"], specs["multiclass"], METRIC["multiclass"]):
        want.update(train_pack([fit], SETTINGS))
    for n_concurrent in (1, 3, "auto"):
        got = {}
        batch = BatchSettings(n_concurrent=n_concurrent, strategy="auto", precision="fp32", max_epochs=30, patience=5,
                              vram_budget_fraction=0.85)
        summary = BatchRunner(CPU).run(jobs, batch, lambda o, got=got: got.__setitem__(o.key, bits(o)))
        assert summary["ok"] == len(jobs) and summary["packs"] == ["TorchPack"]
        assert got == want, n_concurrent


def test_a_metric_of_another_task_fails_the_fit_with_the_reason(refs):
    got = []
    batch = BatchSettings(n_concurrent=1, strategy="serial", precision="fp32", max_epochs=3, patience=2,
                          vram_budget_fraction=0.85)
    BatchRunner(CPU).run([job(refs["binary"], SPECS[0], "r2")], batch, got.append)
    assert got[0].status == STATUS_FAIL and "metric 'r2' does not score a binary task" in got[0].error
