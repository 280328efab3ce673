"""The serial trainer, the reference: one nn.Module with torch.optim.Adam per fit, one fit at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from watcher_plugins.nn_batch.dropout import dropout_mask, fit_key
from watcher_plugins.nn_batch.model import SurvivorQualityNet
from watcher_plugins.nn_batch.training import (
    HOST_CHECK_EVERY,
    EarlyStopping,
    FitOutcome,
    FitTask,
    OutcomeCallback,
    Trainer,
    TrainSettings,
    autocast,
    clock,
    outcome_from_best,
)


class ModuleFit:
    """One fit as a plain SurvivorQualityNet and torch.optim.Adam, advanced one epoch per call."""

    def __init__(self, task: FitTask, settings: TrainSettings, device: torch.device):
        job, data, rows = task.job, task.data, task.rows
        self.task = task
        self.settings = settings
        self.device = device
        self.started = clock()
        self.model = SurvivorQualityNet(data.n_features, job.hidden_layers, seed=task.init_seed).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
        self.X_train = data.X.index_select(0, rows.train_idx)
        self.y_train = data.y.index_select(0, rows.train_idx)
        self.X_val = data.X.index_select(0, rows.val_idx)
        self.y_val = data.y.index_select(0, rows.val_idx)
        self.dropout_key = fit_key(task.init_seed)
        self.stopping = EarlyStopping(1, settings.patience, (self.X_val.shape[0],), device)
        self.epoch = 0

    def _dropout_masks(self) -> list[torch.Tensor] | None:
        job = self.task.job
        if job.dropout == 0:
            return None
        return [dropout_mask(self.dropout_key, self.epoch, layer, self.task.rows.train_idx, width, job.dropout)
                for layer, width in enumerate(job.hidden_layers)]

    def run_epoch(self) -> None:
        epoch = self.epoch
        masks = self._dropout_masks()
        with autocast(self.settings.precision, self.device):
            pred_train = self.model(self.X_train, masks)
            with torch.no_grad():
                pred_val = self.model(self.X_val).float()
        val_loss = F.mse_loss(pred_val, self.y_val)
        self.stopping.update(epoch, val_loss.view(1), pred_val.view(1, -1))
        if epoch < self.settings.max_epochs - 1:
            loss = F.mse_loss(pred_train.float(), self.y_train)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.epoch += 1

    @property
    def at_end(self) -> bool:
        return self.epoch >= self.settings.max_epochs

    def stopped(self) -> bool:
        """A host sync: has early stopping ended this fit (or has it run every epoch)?"""
        return self.at_end or bool(self.stopping.stopped.item())

    def outcome(self) -> FitOutcome:
        self.stopping.finish(self.settings.max_epochs - 1)
        return outcome_from_best(self.task, self.stopping.best_pred[0], int(self.stopping.best_epoch.item()),
                                 int(self.stopping.stop_epoch.item()), clock() - self.started)


class SerialTrainer(Trainer):
    name = "serial"

    def train(self, tasks: Sequence[FitTask], n_concurrent: int, on_done: OutcomeCallback) -> None:
        for task in tasks:
            self._starting([task])
            fit = ModuleFit(task, self.settings, self.device)
            while True:
                fit.run_epoch()
                self.model_epochs += 1
                if fit.at_end or (fit.epoch % HOST_CHECK_EVERY == 0 and fit.stopped()):
                    break
            on_done(fit.outcome())
        self.running = []
