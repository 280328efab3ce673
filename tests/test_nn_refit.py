"""The NN's refit (#20, nn_batch/refit.py, saved.py, NNBatchExecutor.refit): a best trial's folds train
again to the study's fold scores exactly and give its out-of-fold predictions; one fit on every row
(preprocessing fitted on every row, round(mean(best_epoch + 1)) epochs, nothing held out) is saved as
nn_state.pt + nn_model.json, and saved.predict of those files gives the refit's predictions exactly.
CPU; nn_task_cases' tables (missing cells, a text column; regression, binary, 3-class) and the clean
survivors data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nn_task_cases import METRIC, table_ref

from watcher_plugins import tasks as metrics
from watcher_plugins.data import kfold_splits, load_dataset
from watcher_plugins.executor import RunContext
from watcher_plugins.nn_batch import saved
from watcher_plugins.nn_batch.batch import BatchRunner
from watcher_plugins.nn_batch.executor import NNBatchExecutor, fit_jobs
from watcher_plugins.nn_batch.model import SurvivorQualityNet
from watcher_plugins.nn_batch.pack import loss_scales
from watcher_plugins.nn_batch.preprocess import Preprocessing
from watcher_plugins.nn_batch.protocol import REFIT_ARRAYS_FILE, BatchSettings
from watcher_plugins.nn_batch.refit import refit_epochs, run_refit
from watcher_plugins.nn_batch.training import FitOutcome
from watcher_plugins.records import STATUS_FAIL, STATUS_OK, DataRef, RefitJob, TrialJob

CPU = torch.device("cpu")
FOLDS, SEED = 3, 7
PARAMS = {"hidden_layers": [32, 16], "lr": 1e-2, "weight_decay": 1e-5, "dropout": 0.1}
STUDY = BatchSettings(n_concurrent="auto", strategy="auto", precision="fp32", max_epochs=30, patience=5,
                      vram_budget_fraction=0.85)
SURVIVORS = DataRef(embedded="survivors", rows=400)


def trial_job(ref: DataRef, metric: str, number: int = 2, params: dict | None = None) -> TrialJob:
    return TrialJob("nn", number, params or PARAMS, ref, FOLDS, SEED, metric)


def study(ref: DataRef, metric: str) -> dict[tuple[int, int], FitOutcome]:
    """The trial's folds as a study batch trains them: fused, beside another trial's fits."""
    other = trial_job(ref, metric, number=5, params={"hidden_layers": [64, 8], "lr": 3e-3, "dropout": 0.0})
    got: dict = {}
    BatchRunner(CPU).run(fit_jobs(trial_job(ref, metric)) + fit_jobs(other), STUDY, lambda o: got.__setitem__(o.key, o))
    return got


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("refit-data")
    return {"survivors": SURVIVORS, **{task: table_ref(directory, task) for task in METRIC}}


@pytest.fixture(scope="module")
def refits(refs, tmp_path_factory):
    """For each case: the study's outcomes, the refit's output, its model dir and the dataset. The refit
    trains its folds serially (the study's were fused, beside other fits): the same bits all the same."""
    out = {}
    for case, ref in refs.items():
        metric = METRIC.get(case, "r2")
        found = study(ref, metric)
        trial = trial_job(ref, metric)
        model_dir = tmp_path_factory.mktemp(f"model-{case}")
        fold_info = [{"best_epoch": found[(trial.trial_number, k)].best_epoch} for k in range(FOLDS)]
        serial = BatchSettings(1, "serial", "fp32", STUDY.max_epochs, STUDY.patience, 0.85)
        output = run_refit(BatchRunner(CPU), RefitJob(trial, str(model_dir), fold_info), fit_jobs(trial), serial,
                           lambda o: None)
        out[case] = (found, output, model_dir, load_dataset(ref))
    return out


CASES = ["survivors", "regression", "binary", "multiclass"]


@pytest.mark.parametrize("case", CASES)
def test_the_refits_folds_score_what_the_studys_folds_scored_exactly(refits, case):
    found, output, _, dataset = refits[case]
    result = output.result
    assert result.status == STATUS_OK, result.error
    study_scores = [found[(2, k)].score for k in range(FOLDS)]
    assert result.fold_scores == study_scores and all(math.isfinite(s) for s in study_scores)
    # the out-of-fold predictions, in row order, reproduce each fold's score
    oof = output.oof
    assert oof.shape == ((dataset.n_rows, 3) if case == "multiclass" else (dataset.n_rows,))
    assert not np.isnan(oof).any()
    metric = METRIC.get(case, "r2")
    for k, (_, held_out) in enumerate(kfold_splits(dataset.n_rows, FOLDS, SEED)):
        assert metrics.score(metric, dataset.task, dataset.y[held_out], oof[held_out]) == study_scores[k], k


@pytest.mark.parametrize("case", CASES)
def test_predict_of_the_saved_files_gives_the_refits_predictions_exactly(refits, case):
    _, output, model_dir, dataset = refits[case]
    predictions = saved.predict(model_dir, dataset.X)
    assert np.array_equal(predictions, output.predictions)
    assert predictions.dtype == np.float64 and np.isfinite(predictions).all()
    assert predictions.shape == output.oof.shape
    if case == "multiclass":
        assert np.allclose(predictions.sum(axis=1), 1.0)
    # under another thread count too: predict computes on one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert np.array_equal(saved.predict(model_dir, dataset.X), output.predictions)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES)
def test_the_fit_on_every_row_is_saved_as_a_state_dict_and_its_architecture(refits, case):
    found, output, model_dir, dataset = refits[case]
    assert sorted(output.result.files) == sorted([saved.STATE_FILE, saved.META_FILE])
    meta = json.loads((model_dir / saved.META_FILE).read_text())
    best = [found[(2, k)].best_epoch for k in range(FOLDS)]
    epochs = round(sum(b + 1 for b in best) / FOLDS)
    assert (meta["epochs"], meta["adam_steps"], meta["fold_best_epochs"]) == (epochs, epochs - 1, best)
    assert output.result.info["epochs"] == epochs
    n_outputs = 3 if case == "multiclass" else 1
    assert (meta["task"], meta["hidden_layers"], meta["n_outputs"], meta["precision"]) == \
           (dataset.task, PARAMS["hidden_layers"], n_outputs, "fp32")
    if dataset.task == "regression":
        assert meta["target_mean"] == float(dataset.y.mean()) and meta["target_std"] == float(dataset.y.std())
    else:
        assert (meta["target_mean"], meta["target_std"]) == (0.0, 1.0)
    preprocessing = Preprocessing.from_json(meta["preprocessing"])
    assert meta["n_inputs"] == preprocessing.n_inputs
    # the preprocessing of every row: its statistics are those of all the rows
    assert preprocessing.mean == tuple(float(m) for m in preprocessing.design(dataset.X).mean(axis=0))
    # nn_state.pt is a plain SurvivorQualityNet's state dict, which computes the same function
    net = SurvivorQualityNet(meta["n_inputs"], meta["hidden_layers"], n_outputs=meta["n_outputs"])
    net.load_state_dict(torch.load(model_dir / saved.STATE_FILE, weights_only=True))
    with torch.no_grad():
        out = net(torch.from_numpy(preprocessing.transform(dataset.X))).numpy()
    from watcher_plugins.nn_batch import heads

    assert np.allclose(heads.predictions(out, meta["task"], meta["target_mean"], meta["target_std"]),
                       output.predictions, rtol=1e-5, atol=1e-6 * max(1.0, abs(meta["target_mean"])))


def test_predict_takes_new_rows_with_missing_cells_and_unseen_categories(refits):
    _, _, model_dir, dataset = refits["binary"]
    rows = dataset.X[:4].copy()
    rows[0, :] = np.nan  # every cell missing (a category the saved vocabulary lacks is NaN too: data.encode_rows)
    rows[1, 4] = np.nan
    got = saved.predict(model_dir, rows)
    assert got.shape == (4,) and np.isfinite(got).all() and np.all((got > 0) & (got < 1))
    whole = saved.predict(model_dir, dataset.X)
    assert np.allclose(got[2:], whole[2:4], rtol=1e-6)
    with pytest.raises(ValueError, match="encoded columns"):
        saved.predict(model_dir, dataset.X[:, :3])


def test_a_damaged_model_dir_is_a_value_error_naming_the_file(refits, tmp_path):
    _, _, model_dir, dataset = refits["regression"]
    with pytest.raises(ValueError, match="nn_model.json: cannot read"):
        saved.predict(tmp_path, dataset.X)
    (tmp_path / saved.META_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        saved.predict(tmp_path, dataset.X)


def test_the_epochs_of_the_fit_on_every_row_come_from_the_studys_best_epochs():
    outcomes = [FitOutcome((0, k), STATUS_OK, 0.5, 0.0, 20, b) for k, b in enumerate((3, 9, 10))]
    assert refit_epochs([{"best_epoch": 4}, {"best_epoch": 5}, {"best_epoch": 7}], outcomes) == (6, [4, 5, 7])
    # fold infos that lack a best epoch: the refit's own folds (the same fits)
    assert refit_epochs([{"epochs": 3}] * 3, outcomes) == (8, [3, 9, 10])
    assert refit_epochs([], [FitOutcome((0, 0), STATUS_OK, 0.5, 0.0, 1, 0)]) == (1, [0])


def test_a_fit_on_every_row_divides_by_no_held_out_count():
    every = torch.ones(10, dtype=torch.bool)
    assert loss_scales(every) == (float(np.float32(0.2)), 0.0)
    assert loss_scales(every, "binary") == (float(np.float32(0.1)), 0.0)


def test_the_executor_refits_through_its_worker(refs, tmp_path):
    """Step 5's way: a study batch through NNBatchExecutor (a CPU worker process), then Executor.refit
    with the study's fold infos: fold scores equal, predictions equal saved.predict's, the arrays' file
    gone, a wrong job failed with the reason."""
    ref = refs["multiclass"]
    trial = trial_job(ref, "logloss")
    context = RunContext(output_dir=tmp_path, devices=[], lease_dir=tmp_path / "leases")
    params = {"nn_max_epochs": 30, "nn_patience": 5}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with NNBatchExecutor(params, context) as executor:
        folds = executor.run_batch([trial])
        assert all(r.status == STATUS_OK for r in folds) and all(isinstance(r.info["best_epoch"], int) for r in folds)
        wrong = RefitJob(TrialJob("xgboost", 1, {}, ref, FOLDS, SEED, "logloss"), str(tmp_path / "other"))
        result, refused = executor.refit([RefitJob(trial, str(model_dir), [r.info for r in folds]), wrong])
    assert result.status == STATUS_OK, result.error
    assert result.fold_scores == [r.score for r in folds]
    dataset = load_dataset(ref)
    assert np.array_equal(np.asarray(result.predictions), saved.predict(model_dir, dataset.X))
    assert np.asarray(result.oof).shape == (dataset.n_rows, 3)
    assert not (model_dir / REFIT_ARRAYS_FILE).exists()
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(result.files)
    assert result.info["device"] == "cpu" and result.info["epochs"] >= 1
    assert refused.status == STATUS_FAIL and "'nn' trials only" in refused.error


def test_the_worker_refuses_a_refit_of_another_model_type():
    from watcher_plugins.errors import ProtocolError
    from watcher_plugins.nn_batch.protocol import parse_request

    job = RefitJob(trial_job(SURVIVORS, "r2"), "/tmp/x").to_json()
    assert parse_request(json.dumps({"command": "refit", "job": job}).encode()).refit.trial.params == PARAMS
    job["trial"]["model_type"] = "lightgbm"
    with pytest.raises(ProtocolError, match=r"^\$\.job\.trial\.model_type"):
        parse_request(json.dumps({"command": "refit", "job": job}).encode())


def test_the_refit_of_a_trial_that_cannot_train_again_fails_with_the_reason(tmp_path):
    trial = trial_job(DataRef(path=str(tmp_path / "gone.csv"), target="y"), "r2")
    output = run_refit(BatchRunner(CPU), RefitJob(trial, str(tmp_path)), fit_jobs(trial), STUDY, lambda o: None)
    assert output.result.status == STATUS_FAIL and "fold 0" in output.result.error
    assert output.write_arrays() is None and not Path(tmp_path / saved.STATE_FILE).exists()
