"""The built-in plugin: registers nn_batch, tree_parallel and step 5 compare_models exactly as a
third-party plugin would. Backends are imported lazily, when a run needs them."""

from __future__ import annotations

from watcher_plugins import search_spaces
from watcher_plugins.hookspecs import hookimpl
from watcher_plugins.types import ModelType, WatcherExecutor, WatcherPipelineStep

PLUGIN_NAME = "watcher_plugins"
TREE_MODEL_TYPES = ("catboost", "lightgbm", "xgboost")


def _tree_predict(model_dir, X):
    """A saved tree model's predictions of encoded rows (tree_parallel/saved.py), imported when used."""
    from watcher_plugins.tree_parallel.saved import predict

    return predict(model_dir, X)


# The tree libraries learn every task (each has the task's objective) and report every metric (a fold's
# score is the run's metric of its held-out predictions): tree_parallel/libraries.py.
TREE_TASKS = ("regression", "binary", "multiclass")
TREE_METRICS = ("r2", "rmse", "mae", "logloss", "auc", "accuracy")
# The NN learns every task (nn_batch/heads.py: a regression output, a logit, or one per class) and
# reports every metric (a fold's score is the run's metric of its held-out predictions).
NN_TASKS = ("regression", "binary", "multiclass")
NN_METRICS = ("r2", "rmse", "mae", "logloss", "auc", "accuracy")


def _nn_predict(model_dir, X):
    """A saved NN's predictions of encoded rows (nn_batch/saved.py, on the CPU), imported when used."""
    from watcher_plugins.nn_batch.saved import predict

    return predict(model_dir, X)


# The seed offsets are those the studies were made with: changing one changes every study of that type.
NN = ModelType("nn", search_spaces.suggest_nn, seed_offset=0, metrics=NN_METRICS, tasks=NN_TASKS,
               predict=_nn_predict)
TREES = (ModelType("catboost", search_spaces.suggest_catboost, seed_offset=1, metrics=TREE_METRICS,
                   tasks=TREE_TASKS, predict=_tree_predict),
         ModelType("lightgbm", search_spaces.suggest_lightgbm, seed_offset=2, metrics=TREE_METRICS,
                   tasks=TREE_TASKS, predict=_tree_predict),
         ModelType("xgboost", search_spaces.suggest_xgboost, seed_offset=3, metrics=TREE_METRICS,
                   tasks=TREE_TASKS, predict=_tree_predict))


def _nn_batch_executor() -> type:
    from watcher_plugins.nn_batch.executor import NNBatchExecutor

    return NNBatchExecutor


def _tree_parallel_executor() -> type:
    from watcher_plugins.tree_parallel.executor import TreeParallelExecutor

    return TreeParallelExecutor


def _compare_models_step():
    from watcher_plugins.compare_models import run_compare_models

    return run_compare_models


@hookimpl
def watcher_executors():
    yield WatcherExecutor(
        name="nn_batch",
        model_types=(NN,),
        load=_nn_batch_executor,
        params_schema="watcher_plugins.schemas:nn_batch.params.schema.json",
        description="many SurvivorQualityNet trials at once per GPU, in a persistent worker",
        requires={"nn": "torch"},
        install_hint="pip install torch",
        result_params=("nn_max_epochs", "nn_patience", "precision"),
        # the target was left unscaled before 21be4da; each strategy computed a fit its own way before the
        # one batch-invariant computation of nn_batch/pack.py (session 13)
        result_tags={"nn_target_scaling": "z-score", "nn_fit": "pack-v1"},
    )
    yield WatcherExecutor(
        name="tree_parallel",
        model_types=TREES,
        load=_tree_parallel_executor,
        params_schema="watcher_plugins.schemas:tree_parallel.params.schema.json",
        description="CatBoost / LightGBM / XGBoost trials in parallel pinned worker processes",
        requires={name: name for name in TREE_MODEL_TYPES},
        install_hint="pip install 'watcher_plugins[trees]'",
        result_params=("tree_rounds", "tree_early_stopping_rounds", "tree_device"),
    )


@hookimpl
def watcher_pipeline_steps():
    yield WatcherPipelineStep(
        name="compare_models",
        number=5,
        load=_compare_models_step,
        params_schema="watcher_plugins.schemas:compare_models.params.schema.json",
        description="Optuna studies with k-fold CV over the NN and the tree libraries",
    )
