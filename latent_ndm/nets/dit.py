"""DiT (Peebles & Xie, 2023): a transformer over image patches with adaLN-Zero conditioning on t, used in
place of the U-Net as the diffusion denoiser and as NN(x, t) in F(x, t) = x + t*NN(x, t).

Built from timm's PatchEmbed, Attention and Mlp. As for the U-Net, forward-mode AD in t must work
(dF/dt is one JVP): attention never uses the fused SDPA kernels, which have no forward-AD rule, and
LayerNorm runs in at least float32 under bf16 autocast (docs/MATH.md, section 6.1). The residual stream
stays float32 under autocast too: the float32 position embedding is added to it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from latent_ndm.nets.layers import (
    check_dropout,
    check_input,
    preset,
    sinusoidal_time_embedding,
    timestep_frequencies,
    zero_init,
)

__all__ = ["DiT", "DIT_SIZES", "build_dit"]


DIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=2, hidden=32, depth=2, heads=2, mlp_ratio=4.0),  # tests
    # CPU-sized: patch 2 fits both pixel MNIST (28 -> 14x14 tokens) and its 14x14 VAE latents (7x7 tokens).
    "mnist": dict(patch_size=2, hidden=96, depth=4, heads=3, mlp_ratio=4.0),
    # The paper's DiT-S/2 and DiT-B/2 (33M and 130M parameters on 32x32x4 latents).
    "S": dict(patch_size=2, hidden=384, depth=12, heads=6, mlp_ratio=4.0),
    "B": dict(patch_size=2, hidden=768, depth=12, heads=12, mlp_ratio=4.0),
}

_FREQ_DIM = 256  # width of the sinusoidal time embedding before the MLP (DiT's value)


def _layer_norm(x: Tensor) -> Tensor:
    """Affine-free LayerNorm (eps 1e-6, as DiT) in at least float32, cast back to x.dtype."""
    # bf16 statistics are coarse. An explicit round trip keeps primal and tangent in x.dtype whatever autocast
    # does to the op (it split them for GroupNorm, docs/MATH.md section 6.1); promote_types keeps float64
    # models in float64.
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.layer_norm(x.to(dtype), x.shape[-1:], eps=1e-6).to(x.dtype)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, N, D] scaled and shifted per example by [B, 1, D] (the identity at scale = shift = 0)."""
    return x * (1 + scale) + shift


def _sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim], row-major like PatchEmbed's token order."""
    quarter = dim // 4
    omega = 1.0 / 10_000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (rows, cols):  # half the channels encode the row, half the column
        args = pos.reshape(-1, 1) * omega
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=1).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by t, and whose residual branches are gated by
    t (adaLN-Zero: the gates start at zero, so every block starts as the identity)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, proj_drop=dropout)
        # Always the explicit softmax(QK^T)V path: the fused SDPA kernels have no forward-AD rule, and the
        # same module may be NN inside F, whose dF/dt is a JVP. (timm reads TIMM_FUSED_ATTN at build time.)
        self.attn.fused_attn = False
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"), drop=dropout)
        self.ada = zero_init(nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Apply the block to tokens x [B, N, D] conditioned on c = SiLU(time embedding) [B, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)  # each [B, 1, D]
        x = x + gate1 * self.attn(_modulate(_layer_norm(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(_layer_norm(x), shift2, scale2))


class DiT(nn.Module):
    """Diffusion transformer mapping (x [B,C,H,W], t [B] in [0,1]) to [B,out_channels,H,W], like the U-Net."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        patch_size: int = 2,
        hidden: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        zero_init_out: bool = True,
    ) -> None:
        super().__init__()
        _validate(in_channels, out_channels, image_size, patch_size, hidden, depth, heads, mlp_ratio, dropout)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.patch_size = patch_size
        grid = image_size // patch_size

        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, hidden)
        self.register_buffer("pos_embed", _sincos_2d(hidden, grid), persistent=False)  # [N, D], not learned
        self.register_buffer("freqs", timestep_frequencies(_FREQ_DIM), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.final_ada = nn.Linear(hidden, 2 * hidden)
        self.final = nn.Linear(hidden, patch_size**2 * out_channels)
        self._init_weights(zero_init_out)

    def _init_weights(self, zero_init_out: bool) -> None:
        # DiT's initialisation: xavier for linear maps (the patch conv seen as one), N(0, 0.02) for the time MLP.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for i in (0, 2):
            nn.init.normal_(self.time_mlp[i].weight, std=0.02)
        # adaLN-Zero: every block's modulation starts at zero, so each block is the identity at init.
        for block in self.blocks:
            zero_init(block.ada)
        zero_init(self.final_ada)
        if zero_init_out:
            # Zero output at init: F(x,t) = x + t*NN starts as the identity and the denoiser at 0.
            zero_init(self.final)

    def time_embedding(self, t: Tensor) -> Tensor:
        """Sinusoidal embedding of 1000*t, shape [B, 256] (the U-Net's convention, so t in [0,1] works)."""
        return sinusoidal_time_embedding(t, self.freqs, self.time_mlp[0].weight.dtype)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predict the output for x [B,C,H,W] at times t [B] (a 0-dim t is broadcast over the batch)."""
        t = check_input("DiT", x, t, self.in_channels, self.image_size)

        c = F.silu(self.time_mlp(self.time_embedding(t)))  # [B, D]; every adaLN starts with SiLU
        h = self.patch_embed(x) + self.pos_embed.to(x.dtype)  # [B, N, D]
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        h = self.final(_modulate(_layer_norm(h), shift, scale))  # [B, N, p*p*out]
        p = self.patch_size
        return rearrange(h, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=self.image_size // p, p=p, q=p)


def _validate(
    in_channels: int,
    out_channels: int,
    image_size: int,
    patch_size: int,
    hidden: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    dropout: float,
) -> None:
    """Raise ValueError for hyper-parameters that cannot build a consistent DiT."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
    if patch_size < 1 or image_size < 1 or image_size % patch_size:
        raise ValueError(f"DiT patch_size {patch_size} must divide image_size {image_size}")
    if hidden < 4 or hidden % 4:
        raise ValueError(f"DiT hidden {hidden} must be a positive multiple of 4 (2-D sin-cos positions)")
    if heads < 1 or hidden % heads:
        raise ValueError(f"DiT heads {heads} must divide hidden {hidden}")
    if depth < 1:
        raise ValueError(f"DiT depth must be >= 1, got {depth}")
    if mlp_ratio <= 0:
        raise ValueError(f"DiT mlp_ratio must be positive, got {mlp_ratio}")
    check_dropout(dropout)


def build_dit(size: str, in_channels: int, out_channels: int, image_size: int, **overrides: Any) -> DiT:
    """Build the DiT preset `size` from DIT_SIZES, with keyword overrides."""
    return DiT(in_channels, out_channels, image_size, **preset(DIT_SIZES, size, "DiT", overrides))
