"""SurvivorQualityNet and a fit's initial weights. Every trainer draws them through these functions
(and its dropout masks through dropout.py), so a model computes the same function whether it is
trained alone, in a stream or inside a fused pack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def initial_parameters(n_features: int, hidden_layers: Sequence[int], seed: int,
                       n_outputs: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight [out, in], bias [out]) per layer, as nn.Linear's default init draws them (U(+-1/sqrt(fan_in))),
    from a CPU generator seeded with ``seed``: the same numbers on every device and in every trainer.
    ``n_outputs``: the output layer's width (heads.py: one, or one logit per class)."""
    generator = torch.Generator().manual_seed(int(seed))
    widths = [n_features, *hidden_layers, n_outputs]
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        weight = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)
        bias = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        layers.append((weight, bias))
    return layers


class SurvivorQualityNet(nn.Module):
    """The seed's MLP: n_features -> hidden_layers (Linear, ReLU, dropout) -> n_outputs (1, or one logit
    per class). A saved model's nn_state.pt is its state dict (saved.py).

    Dropout is applied through masks the caller passes (see ``dropout.dropout_mask``) rather than nn.Dropout,
    whose global-RNG draws could not be reproduced by the fused trainer.
    """

    def __init__(self, n_features: int, hidden_layers: Sequence[int], seed: int | None = None, n_outputs: int = 1):
        super().__init__()
        widths = [n_features, *hidden_layers]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], n_outputs)
        if seed is not None:
            self.load_initial(initial_parameters(n_features, hidden_layers, seed, n_outputs))

    @torch.no_grad()
    def load_initial(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for module, (weight, bias) in zip([*self.hidden, self.out], layers):
            module.weight.copy_(weight)
            module.bias.copy_(bias)

    def forward(self, x: torch.Tensor, dropout_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.hidden):
            x = torch.relu(layer(x))
            if dropout_masks is not None:
                x = x * dropout_masks[i].to(x.dtype)
        out = self.out(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out
