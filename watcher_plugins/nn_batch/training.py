"""What one model fit means, defined once for every trainer.

A fit trains SurvivorQualityNet full-batch on one fold's training rows with Adam (lr, L2 weight decay
as torch.optim.Adam applies it) on the task's loss (heads.py has the heads): regression the MSE of the
standardised target; binary the binary cross-entropy of one logit (sigmoid); multiclass the softmax
cross-entropy of one logit per class. Epoch ``t`` (0-based, at most ``max_epochs``):

1. one forward pass with the parameters after ``t`` Adam steps: training rows with that epoch's
   dropout masks, held-out rows without dropout;
2. the held-out loss (the mean over the held-out rows) goes to early stopping: it improves when
   strictly lower than the best so far; the fit stops once ``patience`` epochs have passed without an
   improvement;
3. unless stopped or at the last epoch, one Adam step on the training loss (the mean over the
   training rows).

The result is the job's metric (tasks.score: R² by default) of the held-out predictions of the best
epoch, in the target's units or as probabilities. A fit whose held-out loss is never finite fails. How
each of those numbers is computed, the same whatever trains the fit beside it, is pack.py's.

Trainers keep early stopping on the device (``EarlyStopping``) and look at it from the host every
``HOST_CHECK_EVERY`` epochs, so that no epoch waits on a host sync. A fit that stopped on the device
may run a few more epochs before the host notices; those epochs change nothing, because the device
state of a stopped fit is frozen.
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from watcher_plugins import tasks as metrics
from watcher_plugins.errors import WatcherPluginError
from watcher_plugins.nn_batch.device_data import DeviceDataset, FoldRows
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.records import STATUS_FAIL, STATUS_OK, fold_seed

HOST_CHECK_EVERY = 8
#: Compact a pack once this share of its fits has left.
COMPACT_FRACTION = 0.25


@dataclass(frozen=True)
class TrainSettings:
    max_epochs: int = 200
    patience: int = 20
    precision: str = "fp32"  # fp32 | tf32 | bf16


@dataclass
class FitTask:
    """A fit ready to train: the job, its device dataset and fold rows, and its init seed."""

    job: FitJob
    data: DeviceDataset
    rows: FoldRows

    @property
    def key(self) -> tuple[int, int]:
        return self.job.key

    @property
    def init_seed(self) -> int:
        return fold_seed(self.job.seed, self.job.trial_number, self.job.fold_idx)

    @classmethod
    def build(cls, job: FitJob, data: DeviceDataset) -> FitTask:
        """The job's fit on ``data`` (DeviceDatasetCache.for_fold: its fold's dataset); a
        WatcherPluginError where the job's metric does not score the dataset's task."""
        try:
            metrics.metric_for(data.task, job.metric)
        except (KeyError, ValueError) as exc:
            raise WatcherPluginError(f"trial {job.trial_number} fold {job.fold_idx}: {exc}") from None
        return cls(job=job, data=data, rows=data.fold(job.folds, job.seed, job.fold_idx))


@dataclass
class FitOutcome:
    """A finished fit: ``score`` is its job's metric of the best epoch's held-out predictions (None
    unless status is ok); ``predictions`` those predictions (heads.py: the target's units or
    probabilities), in held-out row order (FoldRows.val_idx_host), kept in the worker (a refit's
    out-of-fold predictions), never sent."""

    key: tuple[int, int]
    status: str
    score: float | None
    seconds: float
    epochs: int = 0
    best_epoch: int = -1
    error: str | None = None
    info: dict = field(default_factory=dict)
    predictions: np.ndarray | None = field(default=None, repr=False)


OutcomeCallback = Callable[[FitOutcome], None]
#: Called with the fits about to train together; fault injection raises from it.
PackHook = Callable[[Sequence["FitTask"]], None]


def outcome_from_best(task: FitTask, best_val_pred: torch.Tensor, best_epoch: int, stop_epoch: int,
                      seconds: float) -> FitOutcome:
    """The result of a finished fit from its best epoch's held-out outputs of the net (in held-out row
    order; [n_val] or, multiclass, [n_val, classes])."""
    if best_epoch < 0:
        return FitOutcome(task.key, STATUS_FAIL, None, seconds, stop_epoch + 1, best_epoch,
                          error="the held-out loss was never finite (the fit diverged)")
    y_val = task.data.y_host[task.rows.val_idx_host]
    predictions = task.data.predictions(best_val_pred.detach().float().cpu().numpy())
    score = metrics.score(task.job.metric, task.data.task, y_val, predictions)
    if not math.isfinite(score):
        return FitOutcome(task.key, STATUS_FAIL, None, seconds, stop_epoch + 1, best_epoch,
                          error=f"the held-out {metrics.METRICS[task.job.metric].display} is not finite ({score})")
    return FitOutcome(task.key, STATUS_OK, score, seconds, stop_epoch + 1, best_epoch, predictions=predictions)


class EarlyStopping:
    """Early stopping on held-out loss for ``n`` fits at once, kept on the device.

    ``best_pred`` holds each fit's predictions at its best epoch ([n, *pred_shape]).
    """

    def __init__(self, n: int, patience: int, pred_shape: Sequence[int], device: torch.device):
        self.patience = patience
        self.best_loss = torch.full((n,), math.inf, device=device)
        self.best_epoch = torch.full((n,), -1, dtype=torch.long, device=device)
        self.stop_epoch = torch.full((n,), -1, dtype=torch.long, device=device)
        self.stopped = torch.zeros(n, dtype=torch.bool, device=device)
        self.best_pred = torch.zeros((n, *pred_shape), device=device)

    def update(self, epoch: int | torch.Tensor, val_loss: torch.Tensor, pred: torch.Tensor) -> None:
        """``epoch``: an int, or a one-element tensor on the device. The state is updated in place, so
        that a captured epoch (CUDA graph) updates the same tensors at every replay."""
        live = ~self.stopped
        improved = live & (val_loss < self.best_loss)
        self.best_loss.copy_(torch.where(improved, val_loss, self.best_loss))
        self.best_epoch.copy_(torch.where(improved, epoch, self.best_epoch))
        expand = improved.view(-1, *([1] * (pred.dim() - 1)))
        self.best_pred.copy_(torch.where(expand, pred.detach().float(), self.best_pred))
        newly = live & (epoch - self.best_epoch >= self.patience)
        self.stop_epoch.copy_(torch.where(newly, epoch, self.stop_epoch))
        self.stopped |= newly

    def finish(self, last_epoch: int) -> None:
        """Fits still running after the last epoch stop there."""
        self.stop_epoch = torch.where(self.stopped, self.stop_epoch, last_epoch)
        self.stopped = torch.ones_like(self.stopped)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the fits at ``index`` (compaction)."""
        for name in ("best_loss", "best_epoch", "stop_epoch", "stopped", "best_pred"):
            setattr(self, name, getattr(self, name).index_select(0, index))


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """torch's matmul mode for the precision (fp32: exact float32, TF32 off; tf32: TF32), restored
    afterwards. Packs of torch ops (pack.TorchPack on CUDA) follow it; the Triton kernels name their
    precision themselves."""
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    old_precision = torch.get_float32_matmul_precision()
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
        torch.backends.cudnn.allow_tf32 = old_cudnn
        torch.set_float32_matmul_precision(old_precision)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer(ABC):
    """Trains fits and reports each as it finishes. ``running`` names the fits in flight, so that an
    OOM at concurrency 1 can be pinned on the fit that did not fit."""

    name: str = ""

    def __init__(self, settings: TrainSettings, device: torch.device, pack_hook: PackHook | None = None,
                 cuda_graphs: bool = True):
        self.settings = settings
        self.device = device
        self.pack_hook = pack_hook
        self.cuda_graphs = cuda_graphs  # on a CUDA device, packs replay a captured epoch
        self.running: list[tuple[int, int]] = []
        self.model_epochs = 0  # epochs run, stopped fits' extra epochs included
        #: Called on the host after each epoch (progress reports). It may read the device rarely
        #: (ProgressMeter: at most once a second), never every epoch: a read waits for queued work.
        self.on_epoch: Callable[[], None] | None = None
        self.active_packs: list = []  # the packs training now (pack.FitPack): progress reads their early stopping
        self.compactions = 0
        self.graph_captures = 0
        self.pack_kinds: set[str] = set()  # TritonPack / TorchPack: which implementation trained

    def _starting(self, tasks: Sequence[FitTask]) -> None:
        self.running = [task.key for task in tasks]
        if self.pack_hook is not None:
            self.pack_hook(tasks)

    @abstractmethod
    def train(self, tasks: Sequence[FitTask], n_concurrent: int, on_done: OutcomeCallback) -> None:
        """Train every task, at most ``n_concurrent`` at a time; call ``on_done`` once per task as it ends."""

    def run_pack(self, pack, on_done: OutcomeCallback) -> None:
        """Train a pack (pack.FitPack) from its current epoch to its end: fits leave as early stopping
        ends them (seen every HOST_CHECK_EVERY epochs), and the pack is compacted once
        COMPACT_FRACTION of it has left."""
        self._begin(pack)
        try:
            while pack.epoch < self.settings.max_epochs:
                pack.run_epoch()
                self.model_epochs += pack.size
                if self.on_epoch is not None:
                    self.on_epoch()
                if pack.epoch % HOST_CHECK_EVERY == 0 and pack.epoch < self.settings.max_epochs:
                    left = pack.leave_stopped(on_done)
                    if left == pack.size:
                        return
                    if left >= max(1, math.ceil(COMPACT_FRACTION * pack.size)):
                        pack.compact()
                        self.compactions += 1
                    self.running = [t.key for t in pack.tasks]
            pack.finish(on_done)
        finally:
            self._end(pack)  # a pack whose fits all stopped early returns with its graph

    def _begin(self, pack) -> None:
        """A pack starts training: on a CUDA device it replays a captured epoch (cuda_graphs)."""
        pack.capture_graph = self.cuda_graphs and pack.device.type == "cuda"
        self.pack_kinds.add(type(pack).__name__)
        self.active_packs.append(pack)

    def _end(self, pack) -> None:
        """A pack is done: count its captures and give back its graph's memory."""
        self.graph_captures += pack.captures
        pack.release()
        if pack in self.active_packs:
            self.active_packs.remove(pack)


def clock() -> float:
    return time.perf_counter()
