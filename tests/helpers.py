"""Shared test helpers (pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def perturbed(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add Gaussian noise to every parameter, so zero-initialised layers are open and outputs non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module
