"""Exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA of the weights, always float32 (in bf16 a decay of 0.999 rounds to 1 and the average never
    moves). The effective decay ramps up as min(decay, (1+n)/(10+n)); buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().float(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
