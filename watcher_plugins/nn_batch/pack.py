"""A fit pack: the one computation of a fit, for one fit or many trained in lockstep.

Every trainer runs fits through packs: serial is a pack of one, streams are packs of one on CUDA
streams, fused is a pack of many. A fit's numbers never depend on its pack: on one device type and
precision, a fit gives the same bits alone, beside any other fits, padded into a wider pack, through
any trainer and at any ``n_concurrent_nn``.

The computation of one fit, epoch ``t`` (training.py has the semantics), on all R rows of its dataset:

- forward, hidden layer l: ``a[l+1] = act(dropout_l(relu(a[l] @ W[l] + b[l])))``, a[0] = X; matmul
  operands in the precision's operand type (bf16 rounds them; fp32 and tf32 are float32, tf32 as the
  GPU's matrix units round), products summed in float32; ReLU and the mask (1 on held-out rows) in
  float32, rounded once to the activation type (bf16 under bf16, else float32);
- output: ``pred = a[L] @ W[L] + b[L]`` in float32; held-out loss: the mean of (pred - y)^2 over the
  fit's held-out rows; loss gradient ``g = (pred - y) * 2/n_train`` on its training rows, 0 elsewhere;
  classification (TorchFit only): ``pred`` is one logit (binary) or one per class (multiclass); the
  held-out loss is the mean binary cross-entropy of ``sigmoid(pred)`` (torch's
  ``binary_cross_entropy_with_logits``), or the mean softmax cross-entropy (``cross_entropy``), and the
  loss gradient ``g = (sigmoid(pred) - y) / n_train``, or ``(softmax(pred) - onehot(y)) / n_train``, on
  the training rows;
- backward, layer l from the top: ``dW[l] = a[l]^T @ gz[l]``, ``db[l] = sum over rows of gz[l]``
  (float32), and for l > 0 ``gz[l-1] = act(where(a[l] <= 0, 0, dropout_{l-1}(gz[l] @ W[l]^T)))``;
- Adam (torch.optim.Adam's update with L2 weight decay), in float32.

Two implementations keep that promise, each by its own means:

- ``TritonPack`` (CUDA): the fits' parameters stacked (and zero-padded) along a model axis, every step
  one launch of pack_kernels.py's batch-invariant kernels for the whole pack; each epoch captured once
  as a CUDA graph and replayed. Regression only: classification packs are not Triton-fused yet, and
  are TorchPacks on CUDA too (slower; the same promise of pack invariance).
- ``TorchPack`` (the CPU, or CUDA without Triton): each fit computed alone with torch ops on tensors
  of its own shapes, freshly allocated. Torch's CPU kernels round by the tensor's size and memory
  alignment (a vectorised body and a scalar tail, MKL's blocking), so stacking fits there would make
  a fit's bits depend on its pack mates.

The bits differ between the two (other kernels, other sum orders), and on the CPU with torch's thread
count (MKL splits its sums by threads): never within one device type, precision and thread count.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from watcher_plugins.nn_batch import dropout as hashing
from watcher_plugins.nn_batch import pack_kernels as kernels
from watcher_plugins.nn_batch.budget import padded_widths
from watcher_plugins.nn_batch.device_data import DeviceDataset
from watcher_plugins.nn_batch.model import initial_parameters
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.nn_batch.training import (
    EarlyStopping,
    FitTask,
    OutcomeCallback,
    TrainSettings,
    clock,
    outcome_from_best,
)
from watcher_plugins.records import DataRef
from watcher_plugins.tasks import BINARY, MULTICLASS, REGRESSION

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
log = logging.getLogger(__name__)


def activation_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def step_sizes(lr: float, step: int) -> tuple[float, float]:
    """(lr / bias_correction1, sqrt(bias_correction2)) of Adam step ``step``, as float32 values: the
    first divided in float64, as torch.optim.Adam divides its Python-float lr."""
    beta1, beta2 = ADAM_BETAS
    return float(np.float32(lr / (1 - beta1**step))), float(np.float32(math.sqrt(1 - beta2**step)))


def loss_scales(train_rows: torch.Tensor, task: str = REGRESSION) -> tuple[float, float]:
    """(2 / training rows (regression; 1 / training rows for a cross-entropy), 1 / held-out rows) of a
    fold, as float32 values. A fit with no held-out row (one on every row) has no held-out loss: 0."""
    n_train = int(train_rows.sum())
    n_val = train_rows.numel() - n_train
    val_scale = float(np.float32(1.0 / n_val)) if n_val else 0.0
    return float(np.float32((2.0 if task == REGRESSION else 1.0) / n_train)), val_scale


def matmul(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> torch.Tensor:
    """a @ b with the precision's operands, products summed in float32 (a bf16 product is exact there)."""
    if bf16:
        return a.to(torch.bfloat16).float() @ b.to(torch.bfloat16).float()
    return a.float() @ b.float()


def forward(X: torch.Tensor, params: Sequence[torch.Tensor], precision: str,
            masks: Sequence[torch.Tensor | None] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The net on rows ``X``: (the activations [X, a[1], ..., a[L]], the outputs [R, n_outputs] in
    float32). ``params``: weight [in, out] and bias [out] per layer; ``masks``: each hidden layer's
    dropout factors, or None (none). TorchFit trains with it, saved.predict predicts with it."""
    bf16, act = precision == "bf16", activation_dtype(precision)
    depth = len(params) // 2 - 1
    masks = masks if masks is not None else [None] * depth
    acts = [X]
    for layer in range(depth):
        z = matmul(acts[-1], params[2 * layer], bf16) + params[2 * layer + 1]
        h = torch.relu(z)
        mask = masks[layer]
        if mask is not None:
            h = h * mask
        acts.append(h.to(act))
    return acts, matmul(acts[-1], params[-2], bf16) + params[-1]


class FitPack(ABC):
    """N fits of one depth on one dataset, trained in lockstep: early stopping, leaving, reporting."""

    def __init__(self, tasks: Sequence[FitTask], settings: TrainSettings, device: torch.device):
        self.tasks = list(tasks)
        self.settings = settings
        self.device = device
        self.data = tasks[0].data
        self.depth = len(tasks[0].job.hidden_layers)
        if any(len(t.job.hidden_layers) != self.depth or t.data is not self.data for t in self.tasks):
            raise ValueError("a pack holds fits of one depth on one dataset (FusedTrainer.plan_groups plans them)")
        self.started = clock()
        self.stopping = EarlyStopping(len(self.tasks), settings.patience, self.pred_shape, device)
        self.left = [False] * len(self.tasks)
        self.epoch = 0
        #: Set by the trainer once the pack's memory is measured: capture the epoch and replay it (CUDA).
        self.capture_graph = False
        self.captures = 0

    @property
    def size(self) -> int:
        return len(self.tasks)

    @property
    def pred_shape(self) -> tuple[int, ...]:
        """One fit's outputs on every row: [R], or [R, classes] (multiclass)."""
        n_outputs = self.data.n_outputs
        return (self.data.n_rows,) if n_outputs == 1 else (self.data.n_rows, n_outputs)

    @property
    def dropout(self) -> list[float]:
        return [t.job.dropout for t in self.tasks]

    def run_epoch(self) -> None:
        """One epoch: evaluation, then (before the last epoch) an Adam step."""
        self._run_epoch(stepping=self.epoch < self.settings.max_epochs - 1)
        self.epoch += 1

    @abstractmethod
    def _run_epoch(self, stepping: bool) -> None:
        """The epoch's device work, early stopping's update included."""

    def release(self) -> None:
        """Give back what the pack holds beyond its state (a captured graph's memory)."""

    def leave_stopped(self, on_done: OutcomeCallback) -> int:
        """Report fits that early stopping ended (they change no more: TorchPack skips a fit that left,
        TritonPack zeroed its widths when it stopped). Returns how many have left in all."""
        stopped = self.stopping.stopped.tolist()
        newly = [m for m in range(self.size) if stopped[m] and not self.left[m]]
        if newly:
            self._report(newly, on_done)
        return sum(self.left)

    def finish(self, on_done: OutcomeCallback) -> None:
        self.stopping.finish(self.settings.max_epochs - 1)
        self._report([m for m in range(self.size) if not self.left[m]], on_done)

    def _report(self, models: list[int], on_done: OutcomeCallback) -> None:
        best_epoch = self.stopping.best_epoch.tolist()
        stop_epoch = self.stopping.stop_epoch.tolist()
        seconds = clock() - self.started
        for m in models:
            task = self.tasks[m]
            best_val = self.stopping.best_pred[m].index_select(0, task.rows.val_idx)
            outcome = outcome_from_best(task, best_val, best_epoch[m], stop_epoch[m], seconds)
            outcome.info["pack_size"] = self.size
            self.left[m] = True
            on_done(outcome)

    def compact(self) -> None:
        """Drop the fits that left."""
        keep = [m for m in range(self.size) if not self.left[m]]
        index = torch.tensor(keep, device=self.device)
        self.tasks = [self.tasks[m] for m in keep]
        self.left = [False] * len(keep)
        self.stopping.keep(index)
        self._keep(keep, index)

    @abstractmethod
    def _keep(self, keep: list[int], index: torch.Tensor) -> None:
        """Keep only the fits at these positions."""


class TorchFit:
    """One fit computed alone with torch ops, on tensors of its own shapes (TorchPack)."""

    def __init__(self, task: FitTask, settings: TrainSettings, device: torch.device):
        data, job = task.data, task.job
        self.X, self.y = data.X, data.y
        self.task = data.task
        self.precision = settings.precision
        self.bf16 = settings.precision == "bf16"
        self.act = activation_dtype(settings.precision)
        init = initial_parameters(data.n_features, job.hidden_layers, task.init_seed, data.n_outputs)
        self.params = [t.to(device) for weight, bias in init for t in (weight.T.contiguous(), bias.clone())]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.lr, self.weight_decay = job.lr, job.weight_decay
        self.train = task.rows.train_rows
        self.loss_scale, self.val_scale = loss_scales(self.train, data.task)
        self.widths = list(job.hidden_layers)
        self.p = job.dropout
        self.key = hashing.fit_key(task.init_seed)
        self.steps = 0
        if data.task == MULTICLASS:
            assert data.y_codes is not None  # DeviceDataset.from_dataset keeps a multiclass target's codes
            self.codes = data.y_codes
            self.onehot = F.one_hot(data.y_codes, data.n_outputs).float()

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return matmul(a, b, self.bf16)

    def _masks(self, epoch: int) -> list[torch.Tensor | None]:
        """Each hidden layer's dropout factors on every row [R, width] (1 on held-out rows), or None."""
        if self.p == 0:
            return [None] * len(self.widths)
        rows = torch.arange(self.X.shape[0], device=self.X.device)
        return [torch.where(self.train[:, None], hashing.dropout_mask(self.key, epoch, layer, rows, width, self.p), 1.0)
                for layer, width in enumerate(self.widths)]

    def epoch(self, epoch: int, stepping: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch; returns (held-out loss [], the net's outputs on every row [R], or [R, classes])."""
        masks = self._masks(epoch)
        acts, out = forward(self.X, self.params, self.precision, masks)
        if self.task == REGRESSION:
            pred = out.squeeze(1)
            diff = pred - self.y
            val_loss = torch.where(self.train, 0.0, diff * diff).sum() * self.val_scale
            if stepping:
                self._step(acts, masks, torch.where(self.train, diff * self.loss_scale, 0.0))
            return val_loss, pred
        if self.task == BINARY:
            pred = out.squeeze(1)
            losses = F.binary_cross_entropy_with_logits(pred, self.y, reduction="none")
            grad = torch.where(self.train, (torch.sigmoid(pred) - self.y) * self.loss_scale, 0.0)
        else:
            pred = out
            losses = F.cross_entropy(pred, self.codes, reduction="none")
            grad = torch.where(self.train[:, None], (torch.softmax(pred, dim=1) - self.onehot) * self.loss_scale, 0.0)
        val_loss = torch.where(self.train, 0.0, losses).sum() * self.val_scale
        if stepping:
            self._step(acts, masks, grad)
        return val_loss, pred

    @torch.no_grad()
    def _step(self, acts: list[torch.Tensor], masks: list[torch.Tensor | None], grad: torch.Tensor) -> None:
        """One Adam step from the loss gradient of the outputs ([R], or [R, classes])."""
        gz = grad.to(self.act)
        if gz.dim() == 1:
            gz = gz.unsqueeze(1)
        grads: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        for layer in reversed(range(len(self.widths) + 1)):
            grads[2 * layer] = self._mm(acts[layer].T, gz)
            grads[2 * layer + 1] = gz.float().sum(0)
            if layer > 0:
                ga = self._mm(gz, self.params[2 * layer].T)
                mask = masks[layer - 1]
                if mask is not None:
                    ga = ga * mask
                gz = torch.where(acts[layer].float() <= 0, 0.0, ga).to(self.act)
        self.steps += 1
        step_size, bias_correction2_sqrt = step_sizes(self.lr, self.steps)
        beta1, beta2 = ADAM_BETAS
        for param, grad_, exp_avg, exp_avg_sq in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            g = grad_ + param * float(np.float32(self.weight_decay))
            exp_avg.copy_(exp_avg + (g - exp_avg) * (1 - beta1))
            exp_avg_sq.copy_(exp_avg_sq * beta2 + (g * g) * (1 - beta2))
            denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + ADAM_EPS
            param.copy_(param - (exp_avg / denom) * step_size)


class TorchPack(FitPack):
    """A pack whose fits are each computed alone by TorchFit (the CPU, or CUDA without Triton)."""

    def __init__(self, tasks: Sequence[FitTask], settings: TrainSettings, device: torch.device):
        super().__init__(tasks, settings, device)
        self.fits = [TorchFit(task, settings, device) for task in self.tasks]
        self._idle_pred = torch.zeros(self.pred_shape, device=device)
        self._idle_loss = torch.tensor(math.inf, device=device)

    def _run_epoch(self, stepping: bool) -> None:
        losses, preds = [], []
        for fit, left in zip(self.fits, self.left):
            loss, pred = (self._idle_loss, self._idle_pred) if left else fit.epoch(self.epoch, stepping)
            losses.append(loss)
            preds.append(pred)
        self.stopping.update(self.epoch, torch.stack(losses), torch.stack(preds))

    def _keep(self, keep: list[int], index: torch.Tensor) -> None:
        self.fits = [self.fits[m] for m in keep]


class TritonPack(FitPack):
    """N fits stacked along a model axis, trained by pack_kernels.py's kernels on a CUDA device.

    Weights are [N, in, out] with zero padding to the pack's widest fit of each layer (layer 0's
    input is the shared X), biases [N, out]; every kernel reads each fit's real widths, so padding is
    never read. Activations [N, R, width] and the buffers of a step are allocated once per pack: an
    epoch allocates nothing but early stopping's temporaries, and is captured as a CUDA graph after one
    warm-up epoch (small packs were bound by Python launching their kernels).
    """

    def __init__(self, tasks: Sequence[FitTask], settings: TrainSettings, device: torch.device):
        super().__init__(tasks, settings, device)
        if self.data.task != REGRESSION:
            raise ValueError("TritonPack trains regression fits only (new_pack gives classification TorchPacks)")
        self.tiles = kernels.TILES[settings.precision]
        self.act = activation_dtype(settings.precision)
        n, n_features = self.size, self.data.n_features
        self.widths = padded_widths([t.job.hidden_layers for t in self.tasks])
        self.params: list[torch.Tensor] = []
        all_widths = [n_features, *self.widths, 1]
        init = [initial_parameters(n_features, t.job.hidden_layers, t.init_seed) for t in self.tasks]
        for layer in range(self.depth + 1):
            w_stack = torch.zeros(n, all_widths[layer], all_widths[layer + 1])
            b_stack = torch.zeros(n, all_widths[layer + 1])
            for m, layers in enumerate(init):
                weight, bias = layers[layer]  # [out, in], [out]
                w_stack[m, : weight.shape[1], : weight.shape[0]] = weight.T
                b_stack[m, : bias.shape[0]] = bias
            self.params += [w_stack.to(device), b_stack.to(device)]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.lr = torch.tensor([t.job.lr for t in self.tasks], dtype=torch.float64, device=device)
        self.weight_decay = torch.tensor([t.job.weight_decay for t in self.tasks], dtype=torch.float32, device=device)
        scales = [loss_scales(t.rows.train_rows) for t in self.tasks]
        self.loss_scale = torch.tensor([s[0] for s in scales], dtype=torch.float32, device=device)
        self.val_scale = torch.tensor([s[1] for s in scales], dtype=torch.float32, device=device)
        self._set_fits_state()
        # The epoch and the Adam step count live on the device, with the bias corrections of every step
        # in tables, so that a captured epoch (CUDA graph) replays with the right ones.
        self.epoch_on_device = torch.zeros(1, dtype=torch.int64, device=device)
        self.step_on_device = torch.zeros(1, dtype=torch.int64, device=device)
        beta1, beta2 = ADAM_BETAS
        steps = range(settings.max_epochs + 1)  # index 0 unused: the first step is step 1
        self._bias_correction1 = torch.tensor([1 - beta1**t for t in steps], dtype=torch.float64, device=device)
        self._bias_correction2_sqrt = torch.tensor([math.sqrt(1 - beta2**t) for t in steps], device=device)
        self.chunk_rows, self.n_chunks = kernels.row_chunks(self.data.n_rows)
        self._allocate()
        self._graph: torch.cuda.CUDAGraph | None = None

    def _set_fits_state(self) -> None:
        """The per-fit tensors the kernels read: real widths per layer (a stopped fit's are set to 0 past
        the input, on the device: _epoch_work), dropout keys and row flags."""
        device = self.device
        real = [[self.data.n_features] * self.size]
        real += [[t.job.hidden_layers[i] for t in self.tasks] for i in range(self.depth)]
        real += [[1] * self.size]
        widths = torch.tensor(real, dtype=torch.int32, device=device)  # [layers + 2, N]
        self.real = list(widths)  # a view per layer, as the kernels take them
        self._real_past_input = widths[1:]  # what a stopped fit's widths set to 0 in one launch
        train_rows = torch.stack([t.rows.train_rows for t in self.tasks])
        self.ones = torch.ones(self.size, dtype=torch.int32, device=device)  # a bias's one row
        self.fits_dropout = kernels.PackDropout([hashing.fit_key(t.init_seed) for t in self.tasks], self.dropout,
                                                train_rows)

    def _allocate(self) -> None:
        """The activations and step buffers, at the pack's current size and widths."""
        n, n_rows, device = self.size, self.data.n_rows, self.device
        self.acts = [torch.empty(n, n_rows, w, dtype=self.act, device=device) for w in self.widths]
        widest = max(self.widths)
        self._grad_buffers = [torch.empty(n * n_rows * widest, dtype=self.act, device=device) for _ in range(2)]
        self.pred = torch.empty(n, n_rows, device=device)
        self.out_grad = torch.empty(n, n_rows, dtype=self.act, device=device)
        self.val_loss = torch.empty(n, device=device)
        shapes = [(p.shape[1], p.shape[2]) for p in self.params[::2]]
        self._partials = torch.empty(n * self.n_chunks * max(a * b for a, b in shapes), device=device)
        self._bias_partials = torch.empty(n * self.n_chunks * max(b for _, b in shapes), device=device)

    def _grad_buffer(self, which: int, width: int) -> torch.Tensor:
        n, n_rows = self.size, self.data.n_rows
        return self._grad_buffers[which][: n * n_rows * width].view(n, n_rows, width)

    def forward(self) -> None:
        """Predictions into self.pred [N, R] and the loss gradient into self.out_grad."""
        epoch, tiles, dropout = self.epoch_on_device, self.tiles, self.fits_dropout
        a = self.data.X
        for layer in range(self.depth):
            kernels.hidden_forward(a, self.params[2 * layer], self.params[2 * layer + 1], self.acts[layer],
                                   self.real[layer], self.real[layer + 1], dropout, epoch, layer, tiles)
            a = self.acts[layer]
        kernels.output_forward(a, self.params[-2], self.params[-1], self.real[-2], self.data.y, dropout.train,
                               self.loss_scale, self.pred, self.out_grad, tiles)

    def _epoch_work(self, stepping: bool) -> None:
        """The device work of one epoch; no host sync, no Python state change (it may be captured)."""
        self.forward()
        kernels.held_out_loss(self.pred, self.data.y, self.fits_dropout.train, self.val_scale, self.val_loss)
        self.stopping.update(self.epoch_on_device, self.val_loss, self.pred)
        # A fit that early stopping ended is not computed any more, though it stays in the pack until the
        # host sees it and compaction drops it: its widths past the input go to 0, so every program of
        # its layers returns at once and Adam leaves its parameters as they are; its predictions become
        # its output bias (its best ones are kept apart). The other fits' numbers do not change.
        self._real_past_input.masked_fill_(self.stopping.stopped, 0)
        if stepping:
            self._backward_and_step()
        self.epoch_on_device.add_(1)

    def _backward_and_step(self) -> None:
        """Layer by layer from the top: the weight gradient's row-chunk partials, the gradient for the
        layer below (before Adam changes this layer's weights), then Adam on this layer."""
        self.step_on_device.add_(1)
        n, n_chunks = self.size, self.n_chunks
        gz = self.out_grad.view(n, -1, 1)
        for layer in reversed(range(self.depth + 1)):
            w = self.params[2 * layer]
            n_in, n_out = w.shape[1], w.shape[2]
            a_in = self.acts[layer - 1] if layer > 0 else self.data.X
            part = self._partials[: n * n_chunks * n_in * n_out].view(n, n_chunks, n_in, n_out)
            bias_part = self._bias_partials[: n * n_chunks * n_out].view(n, n_chunks, n_out)
            output_layer = layer == self.depth
            kernels.weight_grad_chunks(a_in, gz, part, bias_part, self.real[layer], self.real[layer + 1],
                                       self.chunk_rows, self.tiles, output_layer)
            below = None
            if layer > 0:
                below = self._grad_buffer(layer % 2, self.widths[layer - 1])
                kernels.input_grad(gz, w, self.acts[layer - 1], below, self.real[layer], self.real[layer + 1],
                                   self.fits_dropout, self.epoch_on_device, layer - 1, self.tiles, output_layer)
            self._adam(2 * layer, part, self.real[layer], self.real[layer + 1])
            self._adam(2 * layer + 1, bias_part, self.ones, self.real[layer + 1])
            if below is not None:  # None only below the first layer, where the loop ends
                gz = below

    def _adam(self, index: int, part: torch.Tensor, i_real: torch.Tensor, j_real: torch.Tensor) -> None:
        kernels.adam(self.params[index], self.exp_avg[index], self.exp_avg_sq[index], part, i_real, j_real,
                     self.lr, self.weight_decay, self.step_on_device, self._bias_correction1,
                     self._bias_correction2_sqrt, ADAM_BETAS, ADAM_EPS)

    def _run_epoch(self, stepping: bool) -> None:
        """With ``capture_graph`` on a CUDA device, the first stepping epoch before the last two runs as
        the warm-up of a capture, and the later ones replay it. Under the pack's device: Triton launches
        on the current device, whatever its tensors' is (a CPU pack: Triton's interpreter, in tests)."""
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            if stepping and self._graph is not None:
                self._graph.replay()
            # a capture pays off only if it is replayed: the warm-up must leave an epoch before the last
            elif stepping and self.epoch < self.settings.max_epochs - 2 and self.capture_graph:
                self._warm_up_and_capture()
            else:
                if not stepping:
                    self.release()  # the graph's memory goes back before the last (eager) epoch
                self._epoch_work(stepping)

    def _warm_up_and_capture(self) -> None:
        """Run this epoch eagerly (so that what is new to these shapes, Triton's compilations, happens
        outside the capture), then capture the next one: replaying it launches the epoch's kernels at
        once. A pack whose capture fails trains on without one."""
        self._epoch_work(stepping=True)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph):
                self._epoch_work(stepping=True)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            # torch.cuda.graph leaves its capture stream current where ending the capture raised: later
            # work (this pack's next epochs, the next pack) must run on the stream it was meant for
            torch.cuda.set_stream(stream)
            # the message as text: a log record that kept the exception would keep its frames
            log.warning("fit pack: the epoch could not be captured as a CUDA graph (%s); training on "
                        "without one", f"{type(exc).__name__}: {exc}")
            self.capture_graph = False
            gc.collect()
            return
        self._graph = graph
        self.captures += 1

    def release(self) -> None:
        """Free the captured epoch and give its memory pool back to the device at once (the caching
        allocator would otherwise keep a released pool until memory runs short)."""
        if self._graph is not None:
            self._graph = None
            torch.cuda.empty_cache()

    def _keep(self, keep: list[int], index: torch.Tensor) -> None:
        """Re-pad to the widest fit that stays; the next epoch captures again (the shapes changed)."""
        self.release()
        new_widths = padded_widths([t.job.hidden_layers for t in self.tasks])
        all_widths = [self.data.n_features, *new_widths, 1]
        for group in (self.params, self.exp_avg, self.exp_avg_sq):
            for i, tensor in enumerate(group):
                layer = i // 2
                tensor = tensor.index_select(0, index)
                if i % 2 == 0:
                    tensor = tensor[:, : all_widths[layer], : all_widths[layer + 1]]
                else:
                    tensor = tensor[:, : all_widths[layer + 1]]
                group[i] = tensor.contiguous()
        self.widths = new_widths
        for name in ("lr", "weight_decay", "loss_scale", "val_scale"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self._set_fits_state()
        self._allocate()


def new_pack(tasks: Sequence[FitTask], settings: TrainSettings, device: torch.device) -> FitPack:
    """The pack for these fits on this device: TritonPack on CUDA where its kernels build and train,
    for regression; else TorchPack. Classification packs are not Triton-fused yet: TorchPacks on CUDA
    too, slower, with the same promise (a fit's numbers do not depend on its pack mates)."""
    if tasks[0].data.task == REGRESSION and device.type == "cuda" and kernels.available() \
            and triton_trains(device, settings.precision):
        return TritonPack(tasks, settings, device)
    return TorchPack(tasks, settings, device)


@functools.cache
def triton_trains(device: torch.device, precision: str) -> bool:
    """Whether a TritonPack trains on this device at this precision: three epochs of a tiny padded pack
    (dropout and none, chunked weight gradients), so that every kernel compiles and runs once, with
    finite results. Where one does not, packs are TorchPacks, with a warning: slower, never wrong."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(256, 5, generator=generator)
    y = X.sum(1)
    data = DeviceDataset("probe", X.to(device), y.to(device), y.numpy())
    ref = DataRef(embedded="survivors", rows=256)
    tasks = [FitTask(job, data, data.fold(2, 0, job.fold_idx)) for job in (
        FitJob(0, 0, 2, 0, (16, 8), 1e-2, 1e-4, 0.0, ref), FitJob(1, 1, 2, 0, (24, 4), 1e-2, 0.0, 0.2, ref))]
    try:
        pack = TritonPack(tasks, TrainSettings(max_epochs=3, patience=3, precision=precision), device)
        for _ in range(3):
            pack.run_epoch()
        finite = bool(torch.isfinite(pack.pred).all())
    except Exception as exc:  # noqa: BLE001 - any failure to build or run means: do without the kernels
        log.warning("nn_batch's Triton kernels do not train at %s on %s (%s: %s); each fit is trained with torch "
                    "ops instead, more slowly", precision, device, type(exc).__name__, exc)
        return False
    if not finite:
        log.warning("nn_batch's Triton kernels gave non-finite predictions at %s on %s; each fit is trained with "
                    "torch ops instead, more slowly", precision, device)
    return finite
