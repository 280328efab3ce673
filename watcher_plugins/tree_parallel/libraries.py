"""How each tree library trains one fold: build its datasets once, fit with early stopping, score the
held-out predictions by the job's metric; and, for a refit, one fit on every row, saved in the library's
own format, loaded again and applied to new rows.

Tree libraries are imported inside the methods, so importing this module is cheap and never loads a
CUDA framework into a process that does not train trees.

Tables (encoding.py turns a dataset into what the libraries take: float32, NaN where missing, category
codes): each library handles missing values and categories natively.

- Missing values: NaN, which XGBoost (``missing`` defaults to NaN) and LightGBM (``use_missing``) take as
  missing, and CatBoost too for numeric features (``nan_mode`` Min, its default: missing sorts below
  every value).
- Categorical columns: CatBoost ``cat_features`` (through a FeaturesData: CatBoost refuses float
  categories, so each code is its decimal string and a missing value the category "-1"); LightGBM
  ``categorical_feature`` (the codes, NaN missing); XGBoost ``enable_categorical`` with ``feature_types``
  "c" on its DMatrix and QuantileDMatrix (``hist`` on the CPU and the GPU partitions categories; a
  missing category takes the learned default direction, an unseen one predicts as missing).
  A dataset without categories builds exactly the datasets it built before tables.
- Tasks: regression as before (CatBoost RMSE, LightGBM regression, XGBoost reg:squarederror); binary:
  CatBoost Logloss, LightGBM binary, XGBoost binary:logistic; multiclass: CatBoost MultiClass, LightGBM
  multiclass, XGBoost multi:softprob (each with the number of classes). Held-out predictions are
  probabilities (of class 1, or one per class). Early stopping watches the library's closest metric to
  the run's (EVAL_METRICS); for r2 and rmse it is RMSE/l2, as before.

Bit-stable results whatever the thread count (checked with 1, 2, 3 and 5 threads on CPU): CatBoost
splits its CPU work into a fixed number of blocks whatever the threads; XGBoost ``hist`` builds
histograms per fixed row block; LightGBM needs ``deterministic=True`` with ``force_row_wise=True``
(its documented recipe). CatBoost's docs do not promise bit-stable GPU training (summation order),
yet on an H200 the same trials gave identical R^2 with 1, 3, 8 and 16 workers
(bench/results/2026-11-28-trees-bench-run1-h200x2/README.md); XGBoost on the GPU did too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from watcher_plugins.tasks import BINARY, MULTICLASS, REGRESSION, metric_for, score
from watcher_plugins.tree_parallel.encoding import TreeEncoding

TREE_MODEL_TYPES = ("catboost", "lightgbm", "xgboost")
# The model types that train on the GPU when the process has one; LightGBM's pip build has no CUDA.
GPU_MODEL_TYPES = frozenset({"catboost", "xgboost"})
# The GPU model types whose trials may share one GPU (up to xgboost_per_gpu at once). DESIGN measured
# four XGBoost processes on one H200 at 1.4x the work of one (on survivors-98k sharing was slower:
# bench/results/2026-11-28-trees-bench-runs2-3-h200x2/README.md); two CatBoost processes ran 2x slower than one.
SHARED_GPU_MODEL_TYPES = frozenset({"xgboost"})
# The GPU model types whose folds may train at once in threads of one worker (xgboost_gpu_fold_threads).
# Processes sharing a GPU time-slice it; threads of one process share its CUDA context, and XGBoost
# launches on per-thread default streams, so their kernels overlap: on an H200, 5 threads on 6 cores
# trained 6 survivors-98k trials 1.68x faster than one fold at a time (which took as long on 6 cores as
# on 2), with bit-identical R^2; 1.03x with the 5 threads on 2 cores, since a GPU XGBoost fit keeps a
# core busy launching kernels (bench/results/2026-11-29-xgboost-fold-threads-h200/). 2.55x with GPU memory from CUDA's
# stream-ordered pool (XGBoostFitter; bench/results/2026-11-29-xgboost-async-pool-h200/).
# Not CatBoost: it never shares its GPU, and its CUDA manager is one per process.
FOLD_THREADS_GPU_MODEL_TYPES = frozenset({"xgboost"})

# The metric early stopping watches, per library, for each run metric and task kind: where the library has
# the run's metric, that one (its multiclass AUC is its own generalisation: CatBoost's Mu, LightGBM's
# auc_mu, XGBoost's prevalence-weighted one-vs-rest); R² ranks the fits of one held-out fold as RMSE does.
# None: the library's default for its objective (CatBoost: the loss itself).
EVAL_METRICS: dict[str, dict[tuple[str, str], str | None]] = {
    "catboost": {
        (REGRESSION, "r2"): None, (REGRESSION, "rmse"): None, (REGRESSION, "mae"): "MAE",
        (BINARY, "logloss"): "Logloss", (BINARY, "auc"): "AUC", (BINARY, "accuracy"): "Accuracy",
        (MULTICLASS, "logloss"): "MultiClass", (MULTICLASS, "auc"): "AUC", (MULTICLASS, "accuracy"): "Accuracy",
    },
    "lightgbm": {
        (REGRESSION, "r2"): "l2", (REGRESSION, "rmse"): "l2", (REGRESSION, "mae"): "l1",
        (BINARY, "logloss"): "binary_logloss", (BINARY, "auc"): "auc", (BINARY, "accuracy"): "binary_error",
        (MULTICLASS, "logloss"): "multi_logloss", (MULTICLASS, "auc"): "auc_mu",
        (MULTICLASS, "accuracy"): "multi_error",
    },
    "xgboost": {
        (REGRESSION, "r2"): "rmse", (REGRESSION, "rmse"): "rmse", (REGRESSION, "mae"): "mae",
        (BINARY, "logloss"): "logloss", (BINARY, "auc"): "auc", (BINARY, "accuracy"): "error",
        (MULTICLASS, "logloss"): "mlogloss", (MULTICLASS, "auc"): "auc", (MULTICLASS, "accuracy"): "merror",
    },
}


def eval_metric(model_type: str, task: str, metric: str) -> str | None:
    """The metric ``model_type``'s early stopping watches in a run of ``metric`` on a ``task`` task (a
    ValueError where the metric does not score the task)."""
    metric_for(task, metric)
    return EVAL_METRICS[model_type][(task, metric)]


@dataclass(frozen=True)
class FitSettings:
    """What every fold fit of a process shares: the round cap, early stopping, threads, GPU or not.

    ``use_gpu`` means "the one GPU this process sees": CUDA_VISIBLE_DEVICES has been narrowed to a
    single GPU before the process started, so CatBoost gets devices="0" and XGBoost device="cuda:0".
    """

    rounds: int
    early_stopping_rounds: int
    threads: int
    use_gpu: bool = False
    # Share of the GPU's memory CatBoost reserves for a fit; None = "auto" (CatBoostFitter says how).
    catboost_gpu_ram_part: float | None = None
    # XGBoost on the GPU allocates from CUDA's stream-ordered pool where it can (XGBoostFitter says why).
    xgboost_async_pool: bool = True
    # The job's metric (tasks.METRICS): what a fold is scored by, and what early stopping watches where the
    # library has it (EVAL_METRICS). Set per job by trial.run_trial.
    metric: str = "r2"


@dataclass(frozen=True)
class FoldFit:
    """The outcome of one fold fit: the job's metric of the held-out predictions at the best iteration."""

    score: float
    best_iteration: int  # boosting rounds kept, counted from 1
    info: dict = field(default_factory=dict)  # what the fit observed, for the fold's result info
    # The held-out predictions scored (tasks.py: float64 values, probabilities of class 1, or [rows, classes])
    predictions: np.ndarray | None = field(default=None, repr=False)


@dataclass
class FoldData:
    """One fold's held-out rows plus whatever the library built from the fold (its prepared datasets).

    ``X_val``: the held-out rows as the library takes them (encoding.features); ``y_val``: their target in
    its own units, float64 (class codes for classification), which the fold is scored against."""

    X_val: np.ndarray
    y_val: np.ndarray
    prepared: Any
    encoding: TreeEncoding | None = None  # None: TreeEncoding.plain

    @property
    def tree_encoding(self) -> TreeEncoding:
        return self.encoding or TreeEncoding.plain(self.X_val.shape[1])


def _score(fold: FoldData, settings: FitSettings, raw: np.ndarray) -> tuple[float, np.ndarray]:
    """The fold's score of a library's held-out predictions ``raw``, and those predictions as scored."""
    encoding = fold.tree_encoding
    predictions = encoding.predictions(raw)
    return score(settings.metric, encoding.task, fold.y_val, predictions), predictions


class TreeFitter(ABC):
    """Trains one fold of one library. ``prepare`` runs once per fold and process; ``fit`` once per trial.

    For a refit: ``fit_all`` trains on every row for a given number of rounds, ``save`` writes the model
    in the library's own format (the file ``MODEL_FILE``), ``load`` reads it back, and ``predict`` applies
    a model (trained here or loaded) to rows on the CPU; both give the same predictions bit for bit.
    """

    model_type: str
    MODEL_FILE: str

    @abstractmethod
    def prepare(self, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                settings: FitSettings, encoding: TreeEncoding) -> Any:
        """Build the library's datasets for one fold (from encoded rows: float32, the training target's
        units); they must be reusable with any trial's params."""

    @abstractmethod
    def fit(self, fold: FoldData, params: dict, seed: int, settings: FitSettings) -> FoldFit:
        """Train on the fold with early stopping on its held-out rows; score the best iteration."""

    @abstractmethod
    def fit_all(self, X: np.ndarray, y: np.ndarray, encoding: TreeEncoding, params: dict, seed: int, rounds: int,
                settings: FitSettings) -> Any:
        """Train ``rounds`` rounds on every row (encoded, as ``prepare`` gets them), no early stopping; the model."""

    @abstractmethod
    def save(self, model: Any, directory: str) -> list[str]:
        """Write ``model`` into ``directory`` in the library's own format; the files written, relative to it."""

    @abstractmethod
    def load(self, directory: str, encoding: TreeEncoding) -> Any:
        """The model ``save`` wrote into ``directory``, read with the library's own loader."""

    @abstractmethod
    def predict(self, model: Any, X: np.ndarray, encoding: TreeEncoding, threads: int | None = None) -> np.ndarray:
        """``model``'s predictions of encoded rows ``X`` on the CPU, as the library gives them (values in the
        training units, the probability of class 1, or [rows, classes]); encoding.predictions maps them."""

    def prepare_fold(self, X_train, y_train, X_val, y_val, settings: FitSettings,
                     encoding: TreeEncoding | None = None) -> FoldData:
        """One fold's datasets from its rows as the dataset holds them (float64, NaN where missing, category
        codes), encoded by ``encoding`` (default: TreeEncoding.plain, the float32 cast alone)."""
        encoding = encoding or TreeEncoding.plain(np.shape(X_train)[1])
        X_val_encoded = encoding.features(X_val)
        prepared = self.prepare(encoding.features(X_train), encoding.target(y_train), X_val_encoded,
                                encoding.target(y_val), settings, encoding)
        return FoldData(X_val=X_val_encoded, y_val=np.asarray(y_val, dtype=np.float64), prepared=prepared,
                        encoding=encoding)


# The reserve "auto" takes, instead of CatBoostFitter.AUTO_GPU_RAM_PART: for the GPU test that makes a
# real out-of-memory with it.
AUTO_GPU_RAM_PART_ENV = "WATCHER_CATBOOST_AUTO_GPU_RAM_PART"


def is_out_of_gpu_memory(message: object) -> bool:
    """Whether a text (a dead worker's stderr line, a fold's error) is a GPU out-of-memory error:
    CatBoost's ("Out of memory", NCudaLib::TOutOfMemoryError) or CUDA's through XGBoost
    ("cudaErrorMemoryAllocation: out of memory", RMM's "out_of_memory")."""
    text = str(message).lower()
    return any(word in text for word in ("out of memory", "outofmemory", "out_of_memory"))


class CatBoostFitter(TreeFitter):
    """CatBoost on quantized Pools: quantizing once per fold instead of once per fit is the library's
    own advice when one dataset is trained many times (it costs about as much as a small fit).

    GPU memory: CatBoost reserves ``gpu_ram_part`` of the GPU's memory at the start of every fit, 0.95
    by default. On an H200 reserving 133 GiB costs 0.4 s per fit, about as much as 200 rounds on a
    survivors-98k fold, which needs less than 42 MiB (bench/results/2026-11-28-catboost-reserve-h200/). "auto"
    (``catboost_gpu_ram_part`` None) reserves ``AUTO_GPU_RAM_PART`` instead. A fit that outgrows its
    reserve aborts the process (CatBoost raises on a thread of its own), so the retry with CatBoost's
    default is the pool's (retry.py). The reserve does not change the model (same R^2 to the last bit,
    tests/gpu/test_tree_gpu.py).
    """

    model_type = "catboost"
    # CatBoost's own defaults per device: 254 borders on CPU, 128 on GPU.
    BORDERS = {False: 254, True: 128}
    AUTO_GPU_RAM_PART = 0.05
    DEFAULT_GPU_RAM_PART = 0.95  # CatBoost's default

    MODEL_FILE = "model.cbm"
    #: A missing category's value: CatBoost takes categories as strings, and a missing one as one more.
    MISSING_CATEGORY = b"-1"

    def features(self, X: np.ndarray, encoding: TreeEncoding) -> Any:
        """Encoded rows as CatBoost takes them: the float32 array itself without categories; else a
        FeaturesData, numeric columns (float32, NaN missing) then categorical ones (each code's decimal
        string as UTF-8 bytes, MISSING_CATEGORY where missing), both in column order."""
        if not encoding.categorical:
            return X
        from catboost import FeaturesData

        cats = np.empty((X.shape[0], len(encoding.categorical)), dtype=object)
        for i, j in enumerate(encoding.categorical):
            codes = X[:, j]
            missing = np.isnan(codes)
            known = int(np.max(codes[~missing])) + 1 if (~missing).any() else 0
            labels = np.array([str(code).encode() for code in range(known)] + [self.MISSING_CATEGORY], dtype=object)
            cats[:, i] = labels[np.where(missing, known, np.nan_to_num(codes)).astype(np.int64)]
        numeric = list(encoding.numeric)
        return FeaturesData(num_feature_data=np.ascontiguousarray(X[:, numeric]) if numeric else None,
                            cat_feature_data=cats,
                            num_feature_names=[encoding.feature_names[j] for j in numeric] if numeric else None,
                            cat_feature_names=encoding.categorical_names())

    @staticmethod
    def _label(y: np.ndarray, encoding: TreeEncoding) -> np.ndarray:
        return y if encoding.task == REGRESSION else y.astype(np.int64)  # class codes, as class_names names them

    def _pool(self, X, y, encoding: TreeEncoding, settings: FitSettings):
        from catboost import Pool

        pool = Pool(self.features(X, encoding), self._label(y, encoding), thread_count=settings.threads)
        if not encoding.categorical:
            # Quantized once per fold; with categories CatBoost hashes each pool's own, so the held-out
            # pool could not share the training pool's: CatBoost quantizes both in each fit instead.
            pool.quantize(border_count=self.BORDERS[settings.use_gpu])
        return pool

    def prepare(self, X_train, y_train, X_val, y_val, settings, encoding):
        from catboost import Pool

        train = self._pool(X_train, y_train, encoding, settings)
        val = Pool(self.features(X_val, encoding), self._label(y_val, encoding), thread_count=settings.threads)
        if not encoding.categorical:
            # The held-out rows must be cut at the training rows' borders, which CatBoost takes from a file.
            with tempfile.TemporaryDirectory(prefix="catboost-borders-") as tmp:
                borders = os.path.join(tmp, "borders.tsv")
                train.save_quantization_borders(borders)
                val.quantize(input_borders=borders)
        return train, val

    def _model(self, encoding: TreeEncoding, settings: FitSettings, **kwargs):
        """A CatBoost model for the task: a regressor (RMSE) or a classifier (Logloss, MultiClass)."""
        from catboost import CatBoostClassifier, CatBoostRegressor

        if settings.use_gpu:
            part = settings.catboost_gpu_ram_part
            if part is None:
                part = float(os.environ.get(AUTO_GPU_RAM_PART_ENV, self.AUTO_GPU_RAM_PART))
            device = {"task_type": "GPU", "devices": "0", "gpu_ram_part": part}
        else:
            device = {"task_type": "CPU"}
        if encoding.task == REGRESSION:
            return CatBoostRegressor(loss_function="RMSE", thread_count=settings.threads, verbose=False,
                                     allow_writing_files=False, **device, **kwargs)
        return CatBoostClassifier(loss_function="Logloss" if encoding.task == BINARY else "MultiClass",
                                  class_names=list(range(encoding.n_classes)), thread_count=settings.threads,
                                  verbose=False, allow_writing_files=False, **device, **kwargs)

    def fit(self, fold, params, seed, settings):
        encoding = fold.tree_encoding
        metric = eval_metric(self.model_type, encoding.task, settings.metric)
        model = self._model(encoding, settings, iterations=settings.rounds, random_seed=seed,
                            early_stopping_rounds=settings.early_stopping_rounds, use_best_model=True,
                            **({"eval_metric": metric} if metric else {}), **params)
        train, val = fold.prepared
        model.fit(train, eval_set=val)
        raw = self.predict(model, fold.X_val, encoding, settings.threads)  # the best iteration's model
        fold_score, predictions = _score(fold, settings, raw)
        return FoldFit(score=fold_score, best_iteration=int(model.get_best_iteration()) + 1, predictions=predictions)

    def fit_all(self, X, y, encoding, params, seed, rounds, settings):
        model = self._model(encoding, settings, iterations=rounds, random_seed=seed, **params)
        model.fit(self._pool(X, y, encoding, settings))
        return model

    def save(self, model, directory):
        model.save_model(os.path.join(directory, self.MODEL_FILE), format="cbm")
        return [self.MODEL_FILE]

    def load(self, directory, encoding):
        from catboost import CatBoostClassifier, CatBoostRegressor

        model = CatBoostRegressor() if encoding.task == REGRESSION else CatBoostClassifier()
        return model.load_model(os.path.join(directory, self.MODEL_FILE), format="cbm")

    def predict(self, model, X, encoding, threads=None):
        data = self.features(X, encoding)
        threads = -1 if threads is None else threads  # CatBoost's "every core"
        if encoding.task == REGRESSION:
            return model.predict(data, thread_count=threads)
        probabilities = model.predict(data, prediction_type="Probability", thread_count=threads)
        return probabilities[:, 1] if encoding.task == BINARY else probabilities


class LightGBMFitter(TreeFitter):
    """LightGBM on CPU threads. One Dataset per fold serves every trial: the search space holds only
    booster params, plus min_child_samples, which a constructed Dataset accepts when
    ``feature_pre_filter`` is off (otherwise LightGBM refuses a smaller min_data_in_leaf)."""

    model_type = "lightgbm"
    DATASET_PARAMS = {"max_bin": 255, "feature_pre_filter": False, "verbose": -1}

    MODEL_FILE = "model.txt"
    OBJECTIVES = {REGRESSION: "regression", BINARY: "binary", MULTICLASS: "multiclass"}

    def _dataset(self, X, y, encoding: TreeEncoding, settings: FitSettings):
        import lightgbm as lgb

        params = {**self.DATASET_PARAMS, "num_threads": settings.threads}
        # "auto", LightGBM's default, finds no categorical column in a numpy array.
        categorical: list[int] | Literal["auto"] = list(encoding.categorical) or "auto"
        return lgb.Dataset(X, y, params=params, free_raw_data=False, categorical_feature=categorical)

    def prepare(self, X_train, y_train, X_val, y_val, settings, encoding):
        import lightgbm as lgb

        train = self._dataset(X_train, y_train, encoding, settings)
        val = lgb.Dataset(X_val, y_val, reference=train, free_raw_data=False)
        with warnings.catch_warnings():
            # "Overriding the parameters from Reference Dataset": expected, the bins must be the train's.
            warnings.simplefilter("ignore", UserWarning)
            train.construct()
            val.construct()
        return train, val

    def _params(self, encoding: TreeEncoding, params: dict, seed: int, settings: FitSettings) -> dict:
        task: dict[str, Any] = {"objective": self.OBJECTIVES[encoding.task],
                                "metric": eval_metric(self.model_type, encoding.task, settings.metric)}
        if encoding.task == MULTICLASS:
            task["num_class"] = encoding.n_classes
        return {
            **task, "verbose": -1, "seed": seed,
            "num_threads": settings.threads, "deterministic": True, "force_row_wise": True,
            # bagging_fraction (searched) has no effect unless bagging runs every k rounds.
            "bagging_freq": 1,
            **self.DATASET_PARAMS, **params,
        }

    def fit(self, fold, params, seed, settings):
        import lightgbm as lgb

        encoding = fold.tree_encoding
        full = self._params(encoding, params, seed, settings)
        train, val = fold.prepared
        booster = lgb.train(full, train, num_boost_round=settings.rounds, valid_sets=[val],
                            callbacks=[lgb.early_stopping(settings.early_stopping_rounds, verbose=False)])
        best = booster.best_iteration or booster.current_iteration()
        raw = booster.predict(fold.X_val, num_iteration=best, num_threads=settings.threads)
        fold_score, predictions = _score(fold, settings, raw)
        return FoldFit(score=fold_score, best_iteration=int(best), predictions=predictions)

    def fit_all(self, X, y, encoding, params, seed, rounds, settings):
        import lightgbm as lgb

        return lgb.train(self._params(encoding, params, seed, settings), self._dataset(X, y, encoding, settings),
                         num_boost_round=rounds)

    def save(self, model, directory):
        model.save_model(os.path.join(directory, self.MODEL_FILE))
        return [self.MODEL_FILE]

    def load(self, directory, encoding):
        import lightgbm as lgb

        return lgb.Booster(model_file=os.path.join(directory, self.MODEL_FILE))

    def predict(self, model, X, encoding, threads=None):
        return model.predict(X, **({"num_threads": threads} if threads is not None else {}))


@functools.cache
def xgboost_has_async_pool() -> bool:
    """Whether the installed XGBoost can allocate GPU memory from CUDA's stream-ordered pool (its global
    ``use_cuda_async_pool``, XGBoost 3.2+)."""
    import xgboost as xgb

    return "use_cuda_async_pool" in xgb.get_config()


class XGBoostFitter(TreeFitter):
    """XGBoost ``hist`` on QuantileDMatrix: quantiles sketched once per fold; on a GPU the first fit
    moves the quantized matrix to the device and later fits reuse it.

    GPU memory: by default XGBoost allocates with cudaMalloc and frees with cudaFree, and cudaFree waits
    for the whole device, so a fold training in one thread stalls every other fold thread's kernels at
    each free. From CUDA's stream-ordered pool (cudaMallocAsync) a free waits for nothing. On an H200, 5
    fold threads trained survivors-98k's XGBoost trials 2.55x faster than one fold at a time with the
    pool, 1.63x without; one fold at a time gained 1.06x; R^2 bit-identical in every arm
    (bench/results/2026-11-29-xgboost-async-pool-h200/). XGBoost's config is per thread, so the pool is set around each fit
    (its allocators keep the setting they were made with, so memory is always freed the way it came).
    Where CUDA refuses the pool (no visible GPU, or a device without stream-ordered allocation, such
    as some virtual GPUs) the fit goes on with cudaMalloc, which gives the same model, and its info
    says why (``xgboost_async_pool_error``).
    """

    model_type = "xgboost"
    MAX_BIN = 256

    @staticmethod
    def uses_async_pool(settings: FitSettings) -> bool:
        """Whether a fit with these settings allocates from CUDA's stream-ordered pool."""
        return settings.use_gpu and settings.xgboost_async_pool and xgboost_has_async_pool()

    MODEL_FILE = "xgboost_model.json"  # not model.json: the core writes its own model.json beside it
    OBJECTIVES = {REGRESSION: "reg:squarederror", BINARY: "binary:logistic", MULTICLASS: "multi:softprob"}

    @staticmethod
    def matrix_args(encoding: TreeEncoding) -> dict:
        """What a DMatrix or QuantileDMatrix of these rows is told of their categorical columns (nothing
        without any: exactly the matrices of before tables)."""
        if not encoding.categorical:
            return {}
        categorical = set(encoding.categorical)
        return {"feature_types": ["c" if j in categorical else "q" for j in range(encoding.n_features)],
                "enable_categorical": True}

    def prepare(self, X_train, y_train, X_val, y_val, settings, encoding):
        import xgboost as xgb

        extra = self.matrix_args(encoding)
        train = xgb.QuantileDMatrix(X_train, y_train, nthread=settings.threads, max_bin=self.MAX_BIN, **extra)
        val = xgb.QuantileDMatrix(X_val, y_val, ref=train, nthread=settings.threads, max_bin=self.MAX_BIN, **extra)
        return train, val

    def _params(self, encoding: TreeEncoding, params: dict, seed: int, settings: FitSettings) -> dict:
        task: dict[str, Any] = {"objective": self.OBJECTIVES[encoding.task],
                                "eval_metric": eval_metric(self.model_type, encoding.task, settings.metric)}
        if encoding.task == MULTICLASS:
            task["num_class"] = encoding.n_classes
        return {
            **task, "tree_method": "hist",
            "max_bin": self.MAX_BIN, "device": "cuda:0" if settings.use_gpu else "cpu",
            "seed": seed, "nthread": settings.threads, "verbosity": 0, **params,
        }

    @contextlib.contextmanager
    def _on_device(self, settings: FitSettings, info: dict) -> Iterator[None]:
        """Around a fit: GPU memory from CUDA's stream-ordered pool where it may (``info`` says what the fit
        got)."""
        import xgboost as xgb

        with contextlib.ExitStack() as on_gpu:
            if self.uses_async_pool(settings):
                try:
                    on_gpu.enter_context(xgb.config_context(use_cuda_async_pool=True))
                except xgb.core.XGBoostError as e:  # XGBoost asks CUDA for the pool first
                    # XGBoost keeps the value it was refused, and config_context, never entered, does not
                    # restore it: every later config change in this thread would fail the same way.
                    xgb.set_config(use_cuda_async_pool=False)
                    info["xgboost_async_pool_error"] = _without_log_time(str(e).splitlines()[0])
            if settings.use_gpu:
                info["xgboost_async_pool"] = bool(xgb.get_config().get("use_cuda_async_pool", False))
            yield

    @staticmethod
    def _check_device(booster, settings: FitSettings, info: dict) -> None:
        if settings.use_gpu:
            # XGBoost quietly falls back to the CPU when it sees no GPU; a GPU trial must not.
            device = json.loads(booster.save_config())["learner"]["generic_param"].get("device", "")
            if not device.startswith("cuda"):
                refused = info.get("xgboost_async_pool_error")
                raise RuntimeError(f"XGBoost found no visible GPU (CUDA_VISIBLE_DEVICES="
                                   f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) and fell back to {device!r}"
                                   + (f"; CUDA refused its memory pool: {refused}" if refused else ""))

    def fit(self, fold, params, seed, settings):
        import xgboost as xgb

        encoding = fold.tree_encoding
        full = self._params(encoding, params, seed, settings)
        train, val = fold.prepared
        info: dict = {}
        with self._on_device(settings, info):
            booster = xgb.train(full, train, num_boost_round=settings.rounds, evals=[(val, "val")],
                                early_stopping_rounds=settings.early_stopping_rounds, verbose_eval=False)
            self._check_device(booster, settings, info)
            best = int(booster.best_iteration)
            raw = booster.predict(val, iteration_range=(0, best + 1))
        fold_score, predictions = _score(fold, settings, raw)
        return FoldFit(score=fold_score, best_iteration=best + 1, info=info, predictions=predictions)

    def fit_all(self, X, y, encoding, params, seed, rounds, settings):
        import xgboost as xgb

        train = xgb.QuantileDMatrix(X, y, nthread=settings.threads, max_bin=self.MAX_BIN, **self.matrix_args(encoding))
        info: dict = {}
        with self._on_device(settings, info):
            booster = xgb.train(self._params(encoding, params, seed, settings), train, num_boost_round=rounds)
            self._check_device(booster, settings, info)
        return booster

    def save(self, model, directory):
        model.save_model(os.path.join(directory, self.MODEL_FILE))
        return [self.MODEL_FILE]

    def load(self, directory, encoding):
        import xgboost as xgb

        return xgb.Booster(model_file=os.path.join(directory, self.MODEL_FILE))

    def predict(self, model, X, encoding, threads=None):
        import xgboost as xgb

        model.set_param({"device": "cpu"})  # a model trained on a GPU predicts on the CPU too, as loaded ones do
        nthread = -1 if threads is None else threads
        return model.predict(xgb.DMatrix(X, nthread=nthread, **self.matrix_args(encoding)))


def _without_log_time(message: str) -> str:
    """XGBoost's error line without its leading "[HH:MM:SS] ", so that one error reads the same twice."""
    return re.sub(r"^\[\d{2}:\d{2}:\d{2}\]\s*", "", message)


FITTERS: dict[str, TreeFitter] = {f.model_type: f for f in (CatBoostFitter(), LightGBMFitter(), XGBoostFitter())}


def fitter_for(model_type: str) -> TreeFitter:
    try:
        return FITTERS[model_type]
    except KeyError:
        raise ValueError(f"unknown tree model type {model_type!r}: expected one of {', '.join(TREE_MODEL_TYPES)}")\
            from None


def runs_on_gpu(model_type: str, process_has_gpu: bool) -> bool:
    """Whether a trial of this model type trains on the GPU in a process pinned to one (or to none)."""
    return process_has_gpu and model_type in GPU_MODEL_TYPES
