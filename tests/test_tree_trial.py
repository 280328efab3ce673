"""One tree trial in-process, and the one-trial command: k-fold CV, early stopping, seeded, R^2."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading

import pytest

from watcher_plugins.data import embedded_survivors, kfold_splits, r2_score
from watcher_plugins.records import DataRef, TrialJob, fold_seed
from watcher_plugins.tree_parallel import libraries
from watcher_plugins.tree_parallel.libraries import FitSettings
from watcher_plugins.tree_parallel.trial import FoldDataCache, run_trial, sample_params

LIBRARY = {"catboost": "catboost", "lightgbm": "lightgbm", "xgboost": "xgboost"}
DATA = DataRef(embedded="survivors", rows=1500)
SETTINGS = FitSettings(rounds=40, early_stopping_rounds=10, threads=1)


def _job(model_type: str, trial: int = 0, params: dict | None = None, folds: int = 3) -> TrialJob:
    return TrialJob(model_type, trial, params if params is not None else sample_params(model_type, trial, 7),
                    DATA, folds, seed=7)


@pytest.mark.parametrize("model_type", sorted(LIBRARY))
def test_a_trial_scores_every_fold_with_early_stopping(model_type):
    pytest.importorskip(LIBRARY[model_type])
    results = run_trial(_job(model_type), SETTINGS)
    assert [r.fold_idx for r in results] == [0, 1, 2]
    assert all(r.status == "ok" and r.error is None for r in results)
    assert all(0.2 < r.score < 1.0 for r in results)  # the embedded data has real signal
    assert all(1 <= r.info["best_iteration"] <= SETTINGS.rounds for r in results)
    assert all(r.info["device"] == "cpu" for r in results)


@pytest.mark.parametrize("model_type", sorted(LIBRARY))
def test_a_trial_is_reproducible_and_independent_of_thread_count(model_type):
    pytest.importorskip(LIBRARY[model_type])
    job = _job(model_type, trial=2)
    one = run_trial(job, SETTINGS)
    two = run_trial(job, FitSettings(SETTINGS.rounds, SETTINGS.early_stopping_rounds, threads=2))
    assert [r.score for r in one] == [r.score for r in two]


def test_fold_datasets_are_built_once_and_reused_across_trials():
    pytest.importorskip("lightgbm")
    cache = FoldDataCache()
    first = run_trial(_job("lightgbm", 0), SETTINGS, cache)
    second = run_trial(_job("lightgbm", 1), SETTINGS, cache)
    assert cache.builds == 3  # one per fold, not one per fold and trial
    # A reused Dataset gives exactly what a fresh one gives, for params that differ in Dataset-level
    # ones too (min_child_samples).
    assert [r.score for r in second] == [r.score for r in run_trial(_job("lightgbm", 1), SETTINGS)]
    assert [r.score for r in first] != [r.score for r in second]


def test_r2_is_scored_on_the_held_out_fold():
    xgb = pytest.importorskip("xgboost")
    job = _job("xgboost", params={"max_depth": 3, "learning_rate": 0.1})
    (result,) = run_trial(job, SETTINGS, fold_indices=[1])
    ds = embedded_survivors(DATA.rows)
    train, val = kfold_splits(ds.n_rows, job.folds, job.seed)[1]

    dtrain = xgb.QuantileDMatrix(ds.X[train], ds.y[train], max_bin=256)
    booster = xgb.train({"max_depth": 3, "learning_rate": 0.1, "seed": fold_seed(7, 0, 1), "nthread": 1,
                         "max_bin": 256, "tree_method": "hist"}, dtrain, num_boost_round=40,
                        evals=[(xgb.QuantileDMatrix(ds.X[val], ds.y[val], ref=dtrain, max_bin=256), "v")],
                        early_stopping_rounds=10, verbose_eval=False)
    assert result.info["best_iteration"] == booster.best_iteration + 1
    # Scored on the raw held-out rows, at the best iteration (not the last).
    pred = booster.predict(xgb.DMatrix(ds.X[val]), iteration_range=(0, booster.best_iteration + 1))
    assert result.score == pytest.approx(r2_score(ds.y[val], pred), abs=1e-6)


def test_a_fold_that_raises_is_a_fail_with_the_error_text():
    pytest.importorskip("lightgbm")
    results = run_trial(_job("lightgbm", params={"num_leaves": -3}), SETTINGS)
    assert [r.status for r in results] == ["fail"] * 3
    assert all(r.score is None and "num_leaves" in r.error for r in results)


@pytest.mark.parametrize("model_type", sorted(LIBRARY))
def test_folds_trained_at_once_in_threads_give_the_same_results_in_fold_order(model_type):
    pytest.importorskip(LIBRARY[model_type])
    job = _job(model_type, trial=1, folds=4)
    alone = run_trial(job, FitSettings(SETTINGS.rounds, SETTINGS.early_stopping_rounds, threads=2))
    reported = []
    together = run_trial(job, FitSettings(SETTINGS.rounds, SETTINGS.early_stopping_rounds, threads=2),
                         fold_threads=3, on_fold=lambda r: reported.append((r.fold_idx, threading.current_thread())))
    assert [r.fold_idx for r in together] == [0, 1, 2, 3]
    assert [(r.score, r.info["best_iteration"]) for r in together] == [(r.score, r.info["best_iteration"]) for r in alone]
    # Each fold reported once, from the caller's thread (the worker writes its protocol from there).
    assert sorted(f for f, _ in reported) == [0, 1, 2, 3]
    assert {t for _, t in reported} == {threading.main_thread()}
    # The cores are shared between the folds running at once: 2 // 3 -> 1 thread each.
    assert {(r.info["concurrent_folds"], r.info["threads"]) for r in together} == {(3, 1)}
    assert {(r.info["concurrent_folds"], r.info["threads"]) for r in alone} == {(1, 2)}


def test_fold_threads_really_train_the_folds_at_once(monkeypatch):
    # Every fit waits at a barrier for the other two before it trains: one fold at a time would break
    # the barrier (after its timeout) and fail the folds.
    pytest.importorskip("xgboost")
    barrier = threading.Barrier(3, timeout=20)
    fit = libraries.XGBoostFitter.fit

    def fit_when_all_three_are_in(self, *args, **kwargs):
        barrier.wait()
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(libraries.XGBoostFitter, "fit", fit_when_all_three_are_in)
    results = run_trial(_job("xgboost"), SETTINGS, fold_threads=3)
    assert [r.status for r in results] == ["ok"] * 3, [r.error for r in results]


def test_when_reporting_a_fold_fails_no_further_fold_starts(monkeypatch):
    # The worker reports each fold to its parent; if the parent is gone (broken pipe), the folds
    # still queued must not train.
    pytest.importorskip("lightgbm")
    fits = []
    fit = libraries.LightGBMFitter.fit

    def counted_fit(self, *args, **kwargs):
        fits.append(1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(libraries.LightGBMFitter, "fit", counted_fit)

    def parent_gone(result):
        raise BrokenPipeError("the pool is gone")

    with pytest.raises(BrokenPipeError):
        run_trial(_job("lightgbm", folds=10), SETTINGS, fold_threads=2, on_fold=parent_gone)
    assert len(fits) <= 4  # the first two, and at most one more each thread had taken up


def test_a_gpu_fold_out_of_memory_next_to_others_is_trained_again_alone(monkeypatch):
    # Simulated GPU memory: folds 0 and 2 do not fit next to the others (a fit with a thread share,
    # i.e. trained at once with other folds, raises CUDA's out-of-memory); fold 2 does not fit even
    # alone. LightGBM trains on CPU whatever use_gpu says, so the fits are real.
    pytest.importorskip("lightgbm")
    job = _job("lightgbm", trial=3)
    seeds = {fold_seed(job.seed, job.trial_number, f): f for f in range(job.folds)}
    fit = libraries.LightGBMFitter.fit

    def fit_in_small_gpu(self, fold, params, seed, settings):
        if seeds[seed] == 2 or (seeds[seed] == 0 and settings.threads < 4):
            raise RuntimeError("cudaErrorMemoryAllocation: out of memory")
        return fit(self, fold, params, seed, settings)

    monkeypatch.setattr(libraries.LightGBMFitter, "fit", fit_in_small_gpu)
    gpu = FitSettings(SETTINGS.rounds, SETTINGS.early_stopping_rounds, threads=4, use_gpu=True)
    reported = []
    results = run_trial(job, gpu, fold_threads=3, on_fold=reported.append)
    serial = run_trial(job, gpu)
    assert sorted(r.fold_idx for r in reported) == [0, 1, 2]  # each fold reported once, its last result
    assert [(r.status, r.score) for r in results] == [(r.status, r.score) for r in serial]
    assert [r.status for r in results] == ["ok", "ok", "fail"] and "out of memory" in results[2].error
    assert [r.info["concurrent_folds"] for r in results] == [1, 3, 1]
    assert [("retried_alone_after" in r.info) for r in results] == [True, False, True]
    # On the CPU there is no GPU memory to free by waiting: the error stands.
    cpu = run_trial(job, dataclasses.replace(gpu, use_gpu=False), fold_threads=3)
    assert [r.status for r in cpu] == ["fail", "ok", "fail"]


def test_a_fold_that_fails_among_threads_fails_alone():
    pytest.importorskip("lightgbm")
    cache = FoldDataCache()
    # Fold 5 of a 3-fold trial does not exist: building it raises, in its own thread.
    results = run_trial(_job("lightgbm"), SETTINGS, cache, fold_indices=[2, 5, 0], fold_threads=3)
    assert [(r.fold_idx, r.status) for r in results] == [(2, "ok"), (5, "fail"), (0, "ok")]
    assert "IndexError" in results[1].error and results[1].score is None
    assert cache.builds == 2  # the shared cache built each real fold once, under its lock


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "watcher_plugins.tree_parallel.trial", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_trial_command_prints_its_result_as_json():
    pytest.importorskip("xgboost")
    pytest.importorskip("optuna")
    done = _cli("--cpu", "--model", "xgboost", "--trial", "1", "--rows", "1500", "--folds", "3",
                "--rounds", "30", "--early-stopping-rounds", "10", "--threads", "1", "--seed", "7")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)  # stdout is exactly one JSON document, whatever the library printed
    assert out["status"] == "ok" and out["device"] == "cpu" and out["model_type"] == "xgboost"
    assert out["params"] == sample_params("xgboost", 1, 7)
    assert out["mean_score"] == pytest.approx(sum(f["score"] for f in out["folds"]) / 3)


def test_the_trial_command_pins_its_gpu_before_the_library_loads():
    pytest.importorskip("lightgbm")
    done = _cli("--gpu", "3", "--model", "lightgbm", "--trial", "0", "--rows", "1500", "--folds", "3",
                "--rounds", "20", "--threads", "1", "--params", json.dumps({"num_leaves": 15}))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # LightGBM has no CUDA build: it trains on CPU threads even in a GPU-pinned process.
    assert out["cuda_visible_devices"] == "3" and out["device"] == "cpu" and out["status"] == "ok"


def test_the_trial_command_reports_bad_params():
    pytest.importorskip("lightgbm")
    done = _cli("--cpu", "--model", "lightgbm", "--rows", "1500", "--folds", "3", "--rounds", "5",
                "--params", json.dumps({"num_leaves": -3}))
    assert done.returncode == 1
    out = json.loads(done.stdout)
    assert out["status"] == "fail" and "num_leaves" in out["error"]


@pytest.mark.parametrize("share", ["0", "1.5", "lots"])
def test_the_trial_command_refuses_a_catboost_reserve_outside_0_to_1(share):
    done = _cli("--cpu", "--model", "catboost", "--catboost-gpu-ram-part", share)
    assert done.returncode == 2
    assert f"--catboost-gpu-ram-part: {share!r} is not a number in (0, 1]" in done.stderr


def test_the_trial_command_trains_folds_at_once_with_fold_threads():
    pytest.importorskip("xgboost")
    args = ("--cpu", "--model", "xgboost", "--trial", "2", "--rows", "1500", "--folds", "3", "--rounds", "30",
            "--threads", "2", "--params", json.dumps({"max_depth": 4}))
    alone, together = json.loads(_cli(*args).stdout), json.loads(_cli(*args, "--fold-threads", "3").stdout)
    assert together["status"] == "ok" and together["mean_score"] == alone["mean_score"]
    assert [f["info"]["concurrent_folds"] for f in together["folds"]] == [3, 3, 3]
    done = _cli("--cpu", "--model", "xgboost", "--fold-threads", "0")
    assert done.returncode == 2 and "--fold-threads: '0' is not an integer >= 1" in done.stderr


def test_the_trial_command_refuses_fold_threads_for_catboost_on_a_gpu():
    done = _cli("--gpu", "0", "--model", "catboost", "--fold-threads", "2", "--params", "{}")
    assert done.returncode == 2
    assert "--fold-threads: catboost trains one fold at a time on a GPU (only xgboost" in done.stderr


def test_xgboost_allocates_from_cudas_pool_only_on_the_gpu_and_where_xgboost_has_it():
    xgboost = pytest.importorskip("xgboost")
    has_pool = tuple(int(part) for part in xgboost.__version__.split(".")[:2]) >= (3, 2)  # use_cuda_async_pool
    assert libraries.xgboost_has_async_pool() is has_pool
    gpu = dataclasses.replace(SETTINGS, use_gpu=True)
    assert libraries.XGBoostFitter.uses_async_pool(gpu) is has_pool
    assert libraries.XGBoostFitter.uses_async_pool(dataclasses.replace(gpu, xgboost_async_pool=False)) is False
    # On the CPU never: setting XGBoost's pool asks CUDA for a device, which fails where there is none.
    assert libraries.XGBoostFitter.uses_async_pool(SETTINGS) is False
    results = run_trial(_job("xgboost"), SETTINGS)
    assert all(r.status == "ok" and "xgboost_async_pool" not in r.info for r in results)


def test_a_pool_cuda_refuses_leaves_xgboosts_config_as_it_was():
    # No GPU here, so CUDA refuses the pool and XGBoost then falls back to the CPU: the GPU fit fails and
    # says both. XGBoost keeps a refused value; left set, every later config change in this thread
    # (config_context included) would fail the same way.
    xgb = pytest.importorskip("xgboost")
    if not libraries.xgboost_has_async_pool():
        pytest.skip("this XGBoost has no stream-ordered pool (3.2+)")
    fold = FoldDataCache().fold(_job("xgboost"), 0, SETTINGS)
    with pytest.raises(RuntimeError, match=r"fell back to 'cpu'; CUDA refused its memory pool: \S"):
        libraries.XGBoostFitter().fit(fold, {}, 0, dataclasses.replace(SETTINGS, use_gpu=True))
    assert xgb.get_config()["use_cuda_async_pool"] is False
    with xgb.config_context(verbosity=0):
        pass


def test_the_trial_command_switches_xgboosts_memory_pool():
    pytest.importorskip("xgboost")
    if not libraries.xgboost_has_async_pool():
        pytest.skip("this XGBoost has no stream-ordered pool (3.2+)")
    args = ("--gpu", "0", "--model", "xgboost", "--rows", "1500", "--folds", "2", "--rounds", "5", "--params", "{}")
    on, off = json.loads(_cli(*args).stdout), json.loads(_cli(*args, "--no-xgboost-async-pool").stdout)
    # No GPU here: both fail, and only the default asked CUDA for its pool.
    assert on["status"] == off["status"] == "fail"
    assert "CUDA refused its memory pool" in on["error"] and "CUDA refused" not in off["error"]
