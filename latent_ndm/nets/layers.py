"""Layers the networks share: sinusoidal time embeddings, GroupNorm in float32, zero initialisation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_frequencies(dim: int) -> Tensor:
    """The dim // 2 frequencies of a sinusoidal embedding of width dim (float32, for a buffer)."""
    half = dim // 2
    return torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)


def sinusoidal_time_embedding(t: Tensor, freqs: Tensor, dtype: torch.dtype) -> Tensor:
    """[cos, sin] of 1000 t times freqs, [B, 2 len(freqs)], in `dtype` (the U-Net's and the DiT's)."""
    # Scaling by 1000 puts continuous t in [0,1] on the frequency range tuned for DDPM's 1000 steps.
    work = torch.promote_types(t.dtype, torch.float32)  # float64 t keeps a smooth float64 embedding
    args = (1000.0 * t.to(work))[:, None] * freqs.to(work)
    # Cast to the MLP's dtype so a float64 model (gradient checks) gets float64 embeddings.
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in at least float32 and cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not is_dual(x):
            # The CPU kernel takes a half-precision x with float32 affine parameters and accumulates the
            # statistics in float32 itself: the round trip below at a quarter of its cost (two fewer
            # passes over the activation, a third of a bf16 step's non-convolution time). Its forward-mode
            # rule would return a float32 tangent, hence the round trip under jvp.
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        # bf16 statistics are too coarse, and under CPU autocast a plain GroupNorm left a bf16 primal
        # with an fp32 tangent that the next conv rejected; an explicit round trip keeps both in x.dtype.
        # promote_types keeps float64 models in float64 (gradient checks).
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


def is_dual(x: Tensor) -> bool:
    """Whether x carries a forward-mode tangent (torch.func.jvp or torch.autograd.forward_ad)."""
    if torch.compiler.is_compiling():
        # dynamo cannot trace the functorch query (a graph break at every GroupNorm, and a bf16 compile
        # that failed in inductor); only the denoiser is ever compiled, never under forward-mode AD.
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(x) or forward_ad.unpack_dual(x).tangent is not None


def preset(table: dict[str, dict[str, Any]], size: str, what: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of preset `size` of a network's size table, with `overrides` on top."""
    if size not in table:
        raise ValueError(f"unknown {what} size {size!r}; choose from {sorted(table)}")
    return {**table[size], **overrides}


def check_input(net: str, x: Tensor, t: Tensor, in_channels: int, image_size: int) -> Tensor:
    """Clear errors for inputs a network was not built for; returns t as [B] (a 0-dim t is broadcast)."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{net} expects x of shape [B, {in_channels}, H, W], got {tuple(x.shape)}")
    if x.shape[-2:] != (image_size, image_size):
        raise ValueError(f"{net} was built for {image_size}x{image_size} inputs, got {x.shape[-2]}x{x.shape[-1]}")
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be 0-dim or of shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
