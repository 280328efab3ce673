"""The Optuna NN study ends the same with n_concurrent_nn 1 (serial) and 8 (fused): same trials, same
params, the same values to the bit. Trials are asked in fixed batches and told in trial-number order."""

from __future__ import annotations

import optuna
import pytest

from watcher_plugins.executor import RunContext
from watcher_plugins.nn_batch.executor import NNBatchExecutor
from watcher_plugins.records import STATUS_OK, DataRef, TrialJob
from watcher_plugins.search_spaces import suggest_nn

DATA = DataRef(embedded="survivors", rows=500)
FOLDS, SEED, ASK_BATCH, N_TRIALS = 2, 42, 4, 8


def run_study(n_concurrent: int, tmp_path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # 4 startup trials: the second batch is sampled by TPE from the first batch's values.
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=SEED, n_startup_trials=ASK_BATCH))
    params = {"n_concurrent_nn": n_concurrent, "nn_max_epochs": 25, "nn_patience": 5}
    with NNBatchExecutor(params, RunContext(output_dir=tmp_path, devices=[])) as executor:
        while len(study.trials) < N_TRIALS:
            asked = [study.ask() for _ in range(ASK_BATCH)]
            jobs = [TrialJob("nn", t.number, suggest_nn(t), DATA, FOLDS, SEED) for t in asked]
            results = executor.run_batch(jobs)
            for trial in sorted(asked, key=lambda t: t.number):
                folds = [r for r in results if r.trial_number == trial.number]
                assert all(r.status == STATUS_OK for r in folds)
                study.tell(trial, sum(r.score for r in folds) / len(folds))
    return study


@pytest.mark.slow
def test_concurrency_1_and_8_end_with_the_same_study(tmp_path):
    serial = run_study(1, tmp_path / "serial")
    fused = run_study(8, tmp_path / "fused")
    assert [t.params for t in serial.trials] == [t.params for t in fused.trials]
    assert [t.value for t in serial.trials] == [t.value for t in fused.trials]
    assert serial.best_trial.number == fused.best_trial.number
