"""The plugin's registration: one executor that owns one model type, ``ridge``.

This module is all the host imports at start-up (through the ``watcher`` entry point): the executor
and scikit-learn are imported only when a run uses them.
"""

from __future__ import annotations

from watcher_plugins import hookimpl
from watcher_plugins.tasks import METRICS, TASKS
from watcher_plugins.types import ModelType, WatcherExecutor


def suggest_ridge(trial) -> dict:
    """l1_ratio 0 is Ridge (L2 only); above it, ElasticNet mixes in L1 at that share. A classification
    fits LogisticRegression with C = 1/alpha and the same penalty mix."""
    return {
        "alpha": trial.suggest_float("alpha", 1e-4, 1e2, log=True),
        "l1_ratio": trial.suggest_float("l1_ratio", 0.0, 1.0, step=0.25),
    }


def predict_ridge(model_dir, X):
    """A saved ridge model (RidgeExecutor.refit) applied to encoded rows: numpy and its JSON alone."""
    from watcher_ridge.model import predict

    return predict(model_dir, X)


def _executor() -> type:
    from watcher_ridge.executor import RidgeExecutor

    return RidgeExecutor


@hookimpl
def watcher_executors():
    yield WatcherExecutor(
        name="ridge",
        # seed_offset: any number no other registered model type uses (the built-ins take 0 to 3)
        model_types=(ModelType("ridge", suggest_ridge, seed_offset=100, metrics=tuple(METRICS), tasks=TASKS,
                               predict=predict_ridge),),
        load=_executor,
        params_schema="watcher_ridge:params.schema.json",
        description="scikit-learn Ridge / ElasticNet (regression) or LogisticRegression (classification) on "
                    "imputed, one-hot, standardised features, on the CPU (a baseline row)",
        requires={"ridge": "sklearn"},
        install_hint="pip install scikit-learn",
        result_params=("ridge_max_iter",),
    )
