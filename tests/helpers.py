"""Shared test helpers (pytest puts this folder on sys.path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def float64():
    """float64 as the default dtype for one test (closed-form comparisons to round-off), then restored.
    A module opts in with `pytestmark = pytest.mark.usefixtures("float64")` after importing it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def perturbed(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add Gaussian noise to every parameter, so zero-initialised layers are open and outputs non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module
