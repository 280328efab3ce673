"""How each tree library trains one fold: build its datasets once, fit with early stopping, score R^2.

Tree libraries are imported inside the methods, so importing this module is cheap and never loads a
CUDA framework into a process that does not train trees.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from watcher_plugins.data import r2_score

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


@dataclass(frozen=True)
class FoldFit:
    """The outcome of one fold fit: R^2 on the held-out rows at the best iteration."""

    r2: float
    best_iteration: int  # boosting rounds kept, counted from 1
    info: dict = field(default_factory=dict)  # what the fit observed, for the fold's result info


@dataclass
class FoldData:
    """One fold's held-out rows plus whatever the library built from the fold (its prepared datasets)."""

    X_val: np.ndarray
    y_val: np.ndarray
    prepared: Any


class TreeFitter(ABC):
    """Trains one fold of one library. ``prepare`` runs once per fold and process; ``fit`` once per trial."""

    model_type: str

    @abstractmethod
    def prepare(self, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                settings: FitSettings) -> Any:
        """Build the library's datasets for one fold; they must be reusable with any trial's params."""

    @abstractmethod
    def fit(self, fold: FoldData, params: dict, seed: int, settings: FitSettings) -> FoldFit:
        """Train on the fold with early stopping on its held-out rows; score the best iteration."""

    def prepare_fold(self, X_train, y_train, X_val, y_val, settings: FitSettings) -> FoldData:
        return FoldData(X_val=X_val, y_val=y_val, prepared=self.prepare(X_train, y_train, X_val, y_val, settings))


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

    def prepare(self, X_train, y_train, X_val, y_val, settings):
        from catboost import Pool

        train = Pool(X_train, y_train, thread_count=settings.threads)
        train.quantize(border_count=self.BORDERS[settings.use_gpu])
        val = Pool(X_val, y_val, thread_count=settings.threads)
        # The held-out rows must be cut at the training rows' borders, which CatBoost takes from a file.
        with tempfile.TemporaryDirectory(prefix="catboost-borders-") as tmp:
            borders = os.path.join(tmp, "borders.tsv")
            train.save_quantization_borders(borders)
            val.quantize(input_borders=borders)
        return train, val

    def fit(self, fold, params, seed, settings):
        from catboost import CatBoostRegressor

        if settings.use_gpu:
            part = settings.catboost_gpu_ram_part
            if part is None:
                part = float(os.environ.get(AUTO_GPU_RAM_PART_ENV, self.AUTO_GPU_RAM_PART))
            device = {"task_type": "GPU", "devices": "0", "gpu_ram_part": part}
        else:
            device = {"task_type": "CPU"}
        model = CatBoostRegressor(
            iterations=settings.rounds, loss_function="RMSE", random_seed=seed, thread_count=settings.threads,
            early_stopping_rounds=settings.early_stopping_rounds, use_best_model=True,
            verbose=False, allow_writing_files=False, **device, **params,
        )
        train, val = fold.prepared
        model.fit(train, eval_set=val)
        pred = model.predict(fold.X_val, thread_count=settings.threads)  # the best iteration's model
        return FoldFit(r2=r2_score(fold.y_val, pred), best_iteration=int(model.get_best_iteration()) + 1)


class LightGBMFitter(TreeFitter):
    """LightGBM on CPU threads. One Dataset per fold serves every trial: the search space holds only
    booster params, plus min_child_samples, which a constructed Dataset accepts when
    ``feature_pre_filter`` is off (otherwise LightGBM refuses a smaller min_data_in_leaf)."""

    model_type = "lightgbm"
    DATASET_PARAMS = {"max_bin": 255, "feature_pre_filter": False, "verbose": -1}

    def prepare(self, X_train, y_train, X_val, y_val, settings):
        import lightgbm as lgb

        params = {**self.DATASET_PARAMS, "num_threads": settings.threads}
        train = lgb.Dataset(X_train, y_train, params=params, free_raw_data=False)
        val = lgb.Dataset(X_val, y_val, reference=train, free_raw_data=False)
        with warnings.catch_warnings():
            # "Overriding the parameters from Reference Dataset": expected, the bins must be the train's.
            warnings.simplefilter("ignore", UserWarning)
            train.construct()
            val.construct()
        return train, val

    def fit(self, fold, params, seed, settings):
        import lightgbm as lgb

        full = {
            "objective": "regression", "metric": "l2", "verbose": -1, "seed": seed,
            "num_threads": settings.threads, "deterministic": True, "force_row_wise": True,
            # bagging_fraction (searched) has no effect unless bagging runs every k rounds.
            "bagging_freq": 1,
            **self.DATASET_PARAMS, **params,
        }
        train, val = fold.prepared
        booster = lgb.train(full, train, num_boost_round=settings.rounds, valid_sets=[val],
                            callbacks=[lgb.early_stopping(settings.early_stopping_rounds, verbose=False)])
        best = booster.best_iteration or booster.current_iteration()
        pred = booster.predict(fold.X_val, num_iteration=best, num_threads=settings.threads)
        return FoldFit(r2=r2_score(fold.y_val, pred), best_iteration=int(best))


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

    def prepare(self, X_train, y_train, X_val, y_val, settings):
        import xgboost as xgb

        train = xgb.QuantileDMatrix(X_train, y_train, nthread=settings.threads, max_bin=self.MAX_BIN)
        val = xgb.QuantileDMatrix(X_val, y_val, ref=train, nthread=settings.threads, max_bin=self.MAX_BIN)
        return train, val

    def fit(self, fold, params, seed, settings):
        import xgboost as xgb

        full = {
            "objective": "reg:squarederror", "eval_metric": "rmse", "tree_method": "hist",
            "max_bin": self.MAX_BIN, "device": "cuda:0" if settings.use_gpu else "cpu",
            "seed": seed, "nthread": settings.threads, "verbosity": 0, **params,
        }
        train, val = fold.prepared
        info: dict = {}
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
            booster = xgb.train(full, train, num_boost_round=settings.rounds, evals=[(val, "val")],
                                early_stopping_rounds=settings.early_stopping_rounds, verbose_eval=False)
            if settings.use_gpu:
                # XGBoost quietly falls back to the CPU when it sees no GPU; a GPU trial must not.
                device = json.loads(booster.save_config())["learner"]["generic_param"].get("device", "")
                if not device.startswith("cuda"):
                    refused = info.get("xgboost_async_pool_error")
                    raise RuntimeError(f"XGBoost found no visible GPU (CUDA_VISIBLE_DEVICES="
                                       f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) and fell back to {device!r}"
                                       + (f"; CUDA refused its memory pool: {refused}" if refused else ""))
            best = int(booster.best_iteration)
            pred = booster.predict(val, iteration_range=(0, best + 1))
        return FoldFit(r2=r2_score(fold.y_val, pred), best_iteration=best + 1, info=info)


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
