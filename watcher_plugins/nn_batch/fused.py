"""The fused trainer: horizontal fusion of many fits into one pack of stacked weights.

A pack holds N fits of one depth on one dataset. Layer 0's weights are stored [features, N, width] so
that the first layer is one wide matmul over the shared input X; deeper layers are [N, in, out] and
run as one batched matmul. Widths that differ inside a pack are zero-padded; the padded units' weight
gradients are masked to zero, so padded weights stay exactly zero, padded units output exactly zero,
and each model computes exactly its own function. All rows of the dataset go through every model;
per-model row weights select the fold's training rows for the loss and its held-out rows for
validation (one forward pass gives both: dropout masks are 1 on held-out rows). Learning rate and
weight decay are per-model tensors in a batched Adam that follows torch.optim.Adam's arithmetic.

Fits that stop early leave the pack (their result is reported, their learning rate and loss weight
drop to zero) and the pack is compacted, re-padded to the widest model left, once a quarter has left.

On a CUDA device a pack's epoch is captured once as a CUDA graph and replayed (``run_epoch``): small
packs were bound by Python launching their kernels. The weight gradients are split along the rows
(affine.py) so that small models' products fill the GPU.

Packs are planned by exact architecture first (``plan_groups``): padding multiplies a pack's work by
its widest model, so only architectures with fewer than ``MIN_EXACT_PACK`` fits are merged, per depth,
into a padded pack. Dropout masks are a pure function of (fit, epoch, layer, row, unit) (dropout.py):
on a CUDA device one Triton kernel per hidden layer applies ReLU and the masks, made in registers
(kernels.py), so no mask is ever stored; elsewhere the torch reference builds them.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from watcher_plugins.nn_batch import dropout as hashing
from watcher_plugins.nn_batch import kernels
from watcher_plugins.nn_batch.affine import affine
from watcher_plugins.nn_batch.budget import VramBudget
from watcher_plugins.nn_batch.model import initial_parameters
from watcher_plugins.nn_batch.training import (
    HOST_CHECK_EVERY,
    EarlyStopping,
    FitTask,
    OutcomeCallback,
    Trainer,
    TrainSettings,
    autocast,
    clock,
    outcome_from_best,
)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
log = logging.getLogger(__name__)

#: Compact the pack once this share of its fits has left.
COMPACT_FRACTION = 0.25
#: An architecture with at least this many fits in a batch gets packs of its own (no padding); fewer
#: fits of one depth are merged into one padded pack.
MIN_EXACT_PACK = 4


@dataclass
class _Param:
    """One stacked parameter with its Adam moments. ``width_axes`` maps a tensor axis to the hidden
    layer whose (padded) width it spans."""

    value: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    model_axis: int
    width_axes: dict[int, int]
    grad_mask: torch.Tensor | None = None

    def per_model(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [N] shaped to broadcast along this parameter's model axis."""
        shape = [1] * self.value.dim()
        shape[self.model_axis] = -1
        return values.view(shape)


class _RepackNeeded(Exception):
    """The first measured step showed that this pack exceeds the calibrated budget."""


class FusedPack:
    """N fits of one depth on one dataset, trained in lockstep."""

    def __init__(self, tasks: Sequence[FitTask], settings: TrainSettings, device: torch.device):
        self.tasks = list(tasks)
        self.settings = settings
        self.device = device
        self.data = tasks[0].data
        self.depth = len(tasks[0].job.hidden_layers)
        self.started = clock()
        n, n_features = len(tasks), self.data.n_features
        self.widths = [max(t.job.hidden_layers[i] for t in tasks) for i in range(self.depth)]
        init = [initial_parameters(n_features, t.job.hidden_layers, t.init_seed) for t in tasks]

        stacks = []
        all_widths = [n_features, *self.widths, 1]
        for layer in range(self.depth + 1):
            w_stack = torch.zeros(n, all_widths[layer], all_widths[layer + 1])
            b_stack = torch.zeros(n, 1, all_widths[layer + 1])
            for m, layers in enumerate(init):
                weight, bias = layers[layer]  # [out, in], [out]
                w_stack[m, : weight.shape[1], : weight.shape[0]] = weight.T
                b_stack[m, 0, : bias.shape[0]] = bias
            stacks.append((w_stack, b_stack))
        self.params: list[_Param] = []
        for layer, (w_stack, b_stack) in enumerate(stacks):
            if layer == 0:
                w, w_axes, w_model = w_stack.permute(1, 0, 2), {2: 0}, 1  # [features, N, width]
                b, b_axes = b_stack[:, 0, :], {1: 0}  # [N, width]
            else:
                w, w_model = w_stack, 0
                w_axes = {1: layer - 1, **({2: layer} if layer < self.depth else {})}
                b, b_axes = b_stack, ({2: layer} if layer < self.depth else {})
            self.params.append(self._param(w, w_model, w_axes))
            self.params.append(self._param(b, 0, b_axes))

        self.lr = torch.tensor([t.job.lr for t in tasks], dtype=torch.float64, device=device)
        self.weight_decay = torch.tensor([t.job.weight_decay for t in tasks], device=device)
        self.dropout = [t.job.dropout for t in tasks]
        self.keys = [hashing.fit_key(t.init_seed) for t in tasks]
        self.train_rows = torch.stack([t.rows.train_rows for t in tasks])  # bool [N, rows]
        self._kernel_dropout = self._kernel_state()
        train_rows = self.train_rows.float()
        self.train_weight = train_rows / train_rows.sum(1, keepdim=True)
        val_rows = 1.0 - train_rows
        self.val_weight = val_rows / val_rows.sum(1, keepdim=True)
        self.stopping = EarlyStopping(n, settings.patience, (self.data.n_rows,), device)
        self.left = [False] * n
        self.epoch = 0
        # The epoch and the Adam step count live on the device too, with the bias corrections of every
        # step in tables, so that a captured epoch (CUDA graph) replays with the right ones.
        self.epoch_on_device = torch.zeros(1, dtype=torch.int64, device=device)
        self.step_on_device = torch.zeros(1, dtype=torch.int64, device=device)
        beta1, beta2 = ADAM_BETAS
        steps = range(settings.max_epochs + 1)  # index 0 unused: the first step is step 1
        self._bias_correction1 = torch.tensor([1 - beta1**t for t in steps], dtype=torch.float64, device=device)
        self._bias_correction2_sqrt = torch.tensor([math.sqrt(1 - beta2**t) for t in steps], device=device)
        #: Set by the trainer once the pack's memory is measured: capture the epoch and replay it.
        self.capture_graph = False
        self.captures = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._update_grad_masks()

    def _param(self, value: torch.Tensor, model_axis: int, width_axes: dict[int, int]) -> _Param:
        value = value.contiguous().to(self.device).requires_grad_(True)
        return _Param(value, torch.zeros_like(value), torch.zeros_like(value), model_axis, width_axes)

    @property
    def size(self) -> int:
        return len(self.tasks)

    def _unit_mask(self, layer: int) -> torch.Tensor:
        """[N, width] with 1 on each model's real units of a hidden layer, 0 on padding."""
        width = self.widths[layer]
        real = torch.tensor([t.job.hidden_layers[layer] for t in self.tasks], device=self.device)
        return (torch.arange(width, device=self.device)[None, :] < real[:, None]).float()

    def _update_grad_masks(self) -> None:
        padded = [any(t.job.hidden_layers[i] < self.widths[i] for t in self.tasks) for i in range(self.depth)]
        for param in self.params:
            mask = None
            for axis, layer in param.width_axes.items():
                if not padded[layer]:
                    continue
                shape = [1] * param.value.dim()
                shape[param.model_axis], shape[axis] = self.size, self.widths[layer]
                unit = self._unit_mask(layer).view(shape)
                mask = unit if mask is None else mask * unit
            param.grad_mask = mask

    def dropout_masks(self, layer: int) -> torch.Tensor:
        """This epoch's masks of a hidden layer, [N, rows, width], the torch reference: model m's
        [:, :its width] slice is ``dropout.dropout_mask`` of its key on its training rows and 1 on its
        held-out rows (1 everywhere for a model without dropout); padded units get finite values that
        multiply outputs that are exactly zero."""
        n, n_rows, device = self.size, self.data.n_rows, self.device
        keys = [hashing.layer_key(k, self.epoch, layer) for k in self.keys]
        draws = hashing.draws(keys, torch.arange(n_rows, device=device), self.widths[layer])
        p = torch.tensor(self.dropout, dtype=torch.float32, device=device).view(n, 1, 1)
        kept = torch.tensor([hashing.keep_factor(q) for q in self.dropout], device=device).view(n, 1, 1)
        train = self.train_rows.view(n, n_rows, 1)
        masks = torch.where(draws >= p, kept, torch.zeros((), device=device))
        return torch.where(train, masks, torch.ones((), device=device))

    def _activation(self, layer: int, z: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """ReLU and dropout of a hidden layer's ``z + bias``; ``z`` is [N, rows, width] (a strided view
        for layer 0). On a CUDA device with Triton, one kernel that makes the masks in registers."""
        if self._kernel_dropout is not None:
            return kernels.relu_dropout(z, self._kernel_dropout, self.epoch_on_device, layer, bias)
        if bias is not None:  # as the kernel adds it: in float32, then rounded to z's dtype once
            z = (z.float() + bias).to(z.dtype)
        h = torch.relu(z)
        if any(p > 0 for p in self.dropout):
            h = h * self.dropout_masks(layer).to(h.dtype)
        return h

    def _kernel_state(self) -> kernels.PackDropout | None:
        if self.device.type != "cuda" or not kernels.available():
            return None
        return kernels.PackDropout(self.keys, self.dropout, self.train_rows)

    def forward(self) -> torch.Tensor:
        """Predictions [N, n_rows] of every model on every row (training-mode dropout on training rows)."""
        X, n, n_rows = self.data.X, self.size, self.data.n_rows
        w0, b0 = self.params[0].value, self.params[1].value
        z = affine(X, w0.reshape(X.shape[1], -1), b0.reshape(1, -1))  # one wide matmul: [rows, N*width]
        h = self._activation(0, z.view(n_rows, n, self.widths[0]).transpose(0, 1))
        for layer in range(1, self.depth + 1):
            w, b = self.params[2 * layer].value, self.params[2 * layer + 1].value
            if layer < self.depth:
                h = self._activation(layer, affine(h, w), b)  # the bias comes with the activation
            else:
                h = affine(h, w, b)
        return h.squeeze(-1)

    def run_epoch(self) -> None:
        """One epoch: evaluation, then (before the last epoch) an Adam step. With ``capture_graph`` on a
        CUDA device, the first such epoch runs as the warm-up of a capture, and the later ones replay it."""
        last = self.settings.max_epochs - 1
        if self.epoch < last and self._graph is not None:
            with torch.cuda.device(self.device):
                self._graph.replay()
        # a capture pays off only if it is replayed: the warm-up must leave an epoch before the last
        elif self.epoch < last - 1 and self.capture_graph and self.device.type == "cuda":
            self._warm_up_and_capture()
        elif self.epoch < last:
            self._epoch_work(stepping=True)
        else:
            self._drop_graph()  # its memory goes back before the last (eager) epoch
            with torch.no_grad():
                self._epoch_work(stepping=False)
        self.epoch += 1

    def _epoch_work(self, stepping: bool) -> None:
        """The device work of one epoch; no host sync, no Python state change (it may be captured)."""
        with autocast(self.settings.precision, self.device):
            pred = self.forward()
        pred = pred.float()
        sq_err = (pred - self.data.y) ** 2
        val_loss = (sq_err.detach() * self.val_weight).sum(1)
        self.stopping.update(self.epoch_on_device, val_loss, pred)
        if stepping:
            loss = (sq_err * self.train_weight).sum()
            loss.backward()
            self._adam_step()
        self.epoch_on_device.add_(1)

    def _warm_up_and_capture(self) -> None:
        """Run this epoch eagerly (so that what is new to these shapes, Triton's compilations and
        cuBLAS's choices, happens outside the capture), then capture the next one: replaying it launches
        the epoch's hundreds of kernels at once, which is what bounds small packs. The warm-up runs on the
        current stream, whose freed blocks torch.cuda.graph returns to the device before the capture
        fills its own pool: the pack never holds both. A pack whose capture fails trains on without one."""
        self._epoch_work(stepping=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph):
                self._epoch_work(stepping=True)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            # the message as text: a log record that kept the exception would keep its frames, and with
            # them the failed capture's autograd nodes, which the next backward would meet
            log.warning("fused pack: the epoch could not be captured as a CUDA graph (%s); training on "
                        "without one", f"{type(exc).__name__}: {exc}")
            self.capture_graph = False
        if not self.capture_graph:
            for param in self.params:
                param.value.grad = None
            gc.collect()  # those autograd nodes may sit in reference cycles of the exception's frames
            return
        self._graph = graph
        self.captures += 1

    def _drop_graph(self) -> None:
        """Free the captured epoch and give its memory pool back to the device at once (the caching
        allocator would otherwise keep a released pool until memory runs short)."""
        if self._graph is not None:
            self._graph = None
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _adam_step(self) -> None:
        """torch.optim.Adam's update (L2 weight decay added to the gradient), per-model lr and decay, in
        the arithmetic of its multi-tensor (CUDA) implementation."""
        beta1, beta2 = ADAM_BETAS
        self.step_on_device.add_(1)
        bias_correction1 = self._bias_correction1.index_select(0, self.step_on_device)
        bias_correction2_sqrt = self._bias_correction2_sqrt.index_select(0, self.step_on_device)
        step_size = (self.lr / bias_correction1).float()  # in float64 first, as Adam's Python-float lr
        for param in self.params:
            grad = param.value.grad
            if param.grad_mask is not None:
                grad.mul_(param.grad_mask)
            grad = torch.addcmul(grad, param.value, param.per_model(self.weight_decay))
            param.exp_avg.lerp_(grad, 1 - beta1)
            param.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (param.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
            param.value.addcmul_(param.exp_avg / denom, param.per_model(-step_size))
            param.value.grad = None

    def leave_stopped(self, on_done: OutcomeCallback) -> int:
        """Report fits that early stopping ended; freeze them. Returns how many have left in all."""
        stopped = self.stopping.stopped.tolist()
        newly = [m for m in range(self.size) if stopped[m] and not self.left[m]]
        if newly:
            self._report(newly, on_done)
            index = torch.tensor(newly, device=self.device)
            self.lr.index_fill_(0, index, 0.0)
            self.train_weight.index_fill_(0, index, 0.0)
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
        """Drop the fits that left and re-pad to the widest model that stays."""
        keep = [m for m in range(self.size) if not self.left[m]]
        index = torch.tensor(keep, device=self.device)
        self._drop_graph()  # the shapes change: the next epoch captures again
        self.tasks = [self.tasks[m] for m in keep]
        self.dropout = [self.dropout[m] for m in keep]
        self.keys = [self.keys[m] for m in keep]
        self.train_rows = self.train_rows.index_select(0, index)
        self._kernel_dropout = self._kernel_state()
        self.left = [False] * len(keep)
        new_widths = [max(t.job.hidden_layers[i] for t in self.tasks) for i in range(self.depth)]
        for param in self.params:
            tensors = []
            for tensor in (param.value.detach(), param.exp_avg, param.exp_avg_sq):
                tensor = tensor.index_select(param.model_axis, index)
                for axis, layer in param.width_axes.items():
                    tensor = tensor.narrow(axis, 0, new_widths[layer])
                tensors.append(tensor.contiguous())
            param.value = tensors[0].requires_grad_(True)
            param.exp_avg, param.exp_avg_sq = tensors[1], tensors[2]
        self.widths = new_widths
        self.lr = self.lr.index_select(0, index)
        self.weight_decay = self.weight_decay.index_select(0, index)
        self.train_weight = self.train_weight.index_select(0, index)
        self.val_weight = self.val_weight.index_select(0, index)
        self.stopping.keep(index)
        self._update_grad_masks()


class FusedTrainer(Trainer):
    name = "fused"

    def __init__(self, settings: TrainSettings, device: torch.device, pack_hook=None,
                 budget: VramBudget | None = None, cuda_graphs: bool = True):
        super().__init__(settings, device, pack_hook)
        self.budget = budget  # None: packs of n_concurrent; else packs sized by the budget, at most that
        self.cuda_graphs = cuda_graphs  # on a CUDA device, packs replay a captured epoch
        self.pack_sizes: list[int] = []
        self.compactions = 0
        self.graph_captures = 0

    @staticmethod
    def plan_groups(tasks: Sequence[FitTask]) -> list[list[FitTask]]:
        """Tasks by (dataset, depth), depths in order of first appearance. Inside a depth, each
        architecture with at least ``MIN_EXACT_PACK`` fits is a group of its own (no padding), widest
        first; the other architectures of that depth form one padded group, widest first, so that a pack
        pads little. Inside a group, fits without dropout come first, so that they tend to share packs
        that draw no masks."""
        depths: dict[tuple[str, int], dict[tuple[int, ...], list[FitTask]]] = {}
        for task in tasks:
            by_arch = depths.setdefault((task.data.key, len(task.job.hidden_layers)), {})
            by_arch.setdefault(tuple(task.job.hidden_layers), []).append(task)

        def order(group: list[FitTask]) -> list[FitTask]:
            return sorted(group, key=lambda t: (tuple(-w for w in t.job.hidden_layers), t.job.dropout > 0))

        groups = []
        for by_arch in depths.values():
            archs = sorted(by_arch, key=lambda a: tuple(-w for w in a))
            groups += [order(by_arch[a]) for a in archs if len(by_arch[a]) >= MIN_EXACT_PACK]
            small = [t for a in archs if len(by_arch[a]) < MIN_EXACT_PACK for t in by_arch[a]]
            if small:
                groups.append(order(small))
        return groups

    def _pack_size(self, queue: Sequence[FitTask], cap: int) -> int:
        if self.budget is None:
            return max(1, min(cap, len(queue)))
        data = queue[0].data
        return self.budget.pack_size([t.job.hidden_layers for t in queue], data.n_rows, data.n_features,
                                     self.settings.precision, any(t.job.dropout > 0 for t in queue), cap)

    def train(self, tasks: Sequence[FitTask], n_concurrent: int, on_done: OutcomeCallback) -> None:
        for group in self.plan_groups(tasks):
            queue = list(group)
            while queue:
                size = self._pack_size(queue, n_concurrent)
                try:
                    self._train_pack(queue[:size], on_done)
                except _RepackNeeded:
                    continue  # nothing of that pack was reported; plan again with the calibrated budget
                queue = queue[size:]
        self.running = []

    def _peak_meter(self) -> Callable[[], int] | None:
        """Where the budget still wants its correction for this precision (on CUDA), start measuring the
        device's peak memory and return what reads the bytes allocated above this point; else None."""
        if self.budget is None or self.device.type != "cuda" \
                or self.budget.is_calibrated(self.settings.precision):
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        return lambda: torch.cuda.max_memory_allocated(self.device) - base

    def _train_pack(self, tasks: Sequence[FitTask], on_done: OutcomeCallback) -> None:
        self._starting(tasks)
        peak = self._peak_meter() if self.settings.max_epochs >= 2 else None
        pack = FusedPack(tasks, self.settings, self.device)
        if peak is not None:
            for _ in range(2):  # the first step and the evaluation after it
                pack.run_epoch()
            # _RepackNeeded abandons the pack here: it is not counted in pack_sizes nor model_epochs.
            self._calibrate(pack, peak())
        self.pack_sizes.append(pack.size)
        self.model_epochs += pack.epoch * pack.size
        pack.capture_graph = self.cuda_graphs
        try:
            self._train_on(pack, on_done)
        finally:
            self.graph_captures += pack.captures
            pack._drop_graph()  # a pack whose fits all stopped early returns with its graph

    def _train_on(self, pack: FusedPack, on_done: OutcomeCallback) -> None:
        while pack.epoch < self.settings.max_epochs:
            pack.run_epoch()
            self.model_epochs += pack.size
            if pack.epoch % HOST_CHECK_EVERY == 0 and pack.epoch < self.settings.max_epochs:
                left = pack.leave_stopped(on_done)
                if left == pack.size:
                    return
                if left >= max(1, math.ceil(COMPACT_FRACTION * pack.size)):
                    pack.compact()
                    self.compactions += 1
                self.running = [t.key for t in pack.tasks]
        pack.finish(on_done)

    def _calibrate(self, pack: FusedPack, measured: int) -> None:
        data = pack.data
        widths = [t.job.hidden_layers for t in pack.tasks]
        dropout = any(p > 0 for p in pack.dropout)
        self.budget.calibrate(self.settings.precision,
                              self.budget.pack_bytes(widths, data.n_rows, data.n_features,
                                                     self.settings.precision, dropout), measured)
        if self.budget.pack_bytes(widths, data.n_rows, data.n_features, self.settings.precision,
                                  dropout) > 1.1 * self.budget.budget_bytes and pack.size > 1:
            raise _RepackNeeded()
