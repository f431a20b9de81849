"""U-Net of the DDPM++/ADM family, used as the diffusion denoiser and as NN(x, t) in F(x, t) = x + t*NN(x, t).

Forward-mode AD (``torch.func.jvp`` / ``torch.autograd.forward_ad``) in t must work, including
reverse-over-forward, so attention is written out explicitly: the fused SDPA kernels have no
forward-AD rule; `forward_and_time_derivative` is a hand-written tangent pass (latent_ndm.nets.tangents).
Normalisation runs in at least float32 so bf16 autocast keeps primal and tangent dtypes aligned.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from latent_ndm.nets import tangents as D
from latent_ndm.nets.layers import (
    GroupNorm32,
    check_dropout,
    check_input,
    preset,
    sinusoidal_time_embedding,
    timestep_frequencies,
    zero_init,
)
from latent_ndm.nets.tangents import Dual

__all__ = ["UNet", "UNET_SIZES", "build_unet"]


UNET_SIZES: dict[str, dict[str, Any]] = {
    # `attn_levels` (indices into channel_mult, negatives allowed) is resolved by build_unet into
    # attn_resolutions for the requested image size, so "tiny" works at 8x8 and 16x16 alike.
    "tiny": dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(-1,), groups=8),
    # 8 groups keep 4 channels per group at the first level; 32 groups would be instance norm there.
    # The CPU MNIST preset: no attention and 16 channels keep an NDM step (denoiser plus two tangent passes
    # of F) cheap on a 2-core CPU.
    "mnist": dict(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), groups=8),
    "small": dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,), groups=8),
    "base": dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2),
    # DDPM++ (Song et al. 2021) size: 4 res blocks per level, not the 2 of DDPM (Ho et al. 2020).
    "ddpmpp_cifar10": dict(
        channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1
    ),
    # VDM's ImageNet networks (Kingma et al. 2021, google-research/vdm configs): no downsampling, 256
    # channels, 32 (64x64: 64) residual blocks down and one more up, attention only in the middle.
    "vdm_imagenet32": dict(channels=256, channel_mult=(1,), num_res_blocks=32, attn_resolutions=(), dropout=0.1),
    "vdm_imagenet64": dict(channels=256, channel_mult=(1,), num_res_blocks=64, attn_resolutions=(), dropout=0.1),
}


class ResBlock(nn.Module):
    """Residual block with scale-shift time conditioning (ADM / DDPM++)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = GroupNorm32(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        # Zero init makes every block start as its skip path, which stabilises deep U-Nets.
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block to x conditioned on the time embedding emb [B, emb_dim]."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.emb(emb), "b (two c) -> two b c 1 1", two=2)
        # Scale-shift after the norm (rather than an additive bias before it) lets t modulate the
        # normalised features multiplicatively; 1+scale keeps the block well-behaved at init.
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h

    def dual(self, x: Dual, emb: Dual) -> Dual:
        """`forward` on (value, d/dt) pairs."""
        h = D.conv(self.conv1, D.silu(D.group_norm(self.norm1, x)))
        e_v, e_d = D.linear(self.emb[1], D.silu(emb))
        split = lambda u: rearrange(u, "b (two c) -> two b c 1 1", two=2)
        (scale, shift), (d_scale, d_shift) = split(e_v), (None, None) if e_d is None else split(e_d)
        h = D.silu(D.scale_shift(D.group_norm(self.norm2, h), (scale, d_scale), (shift, d_shift)))
        if self.training and self.dropout.p > 0:  # one mask for value and tangent
            mask = self.dropout(torch.ones_like(h[0]))
            h = D.apply_linear(lambda u: u * mask, h)
        skip = x if isinstance(self.skip, nn.Identity) else D.conv(self.skip, x)
        return D.add_into(D.conv(self.conv2, h), skip)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions with a residual connection."""

    def __init__(self, ch: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Attend over all H*W positions of x."""
        height = x.shape[-2]
        q, k, v = rearrange(
            self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.num_heads
        )
        # Explicit softmax(QK^T/sqrt(d))V: F.scaled_dot_product_attention's fused kernels have no
        # forward-AD rule. Scaling q (N*d) is cheaper than scaling the N*N logits.
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        # Softmax in at least fp32 so bf16 logits do not saturate; promote_types keeps float64 exact.
        weights = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        out = weights.to(v.dtype) @ v
        return x + self.proj(rearrange(out, "b n (h w) d -> b (n d) h w", h=height))

    def dual(self, x: Dual) -> Dual:
        """`forward` on (value, d/dt) pairs."""
        height = x[0].shape[-2]
        qkv = D.conv(self.qkv, D.group_norm(self.norm, x))
        split = lambda u: rearrange(u, "b (three n d) h w -> three b n (h w) d", three=3, n=self.num_heads)
        (q, k, v), tangents = split(qkv[0]), [None] * 3 if qkv[1] is None else split(qkv[1])
        scale = q.shape[-1] ** -0.5
        q_d = None if tangents[0] is None else tangents[0] * scale
        out = D.attention((q * scale, q_d), (k, tangents[1]), (v, tangents[2]))
        merged = D.apply_linear(lambda u: rearrange(u, "b n (h w) d -> b (n d) h w", h=height), out)
        return D.add_into(D.conv(self.proj, merged), x)


class _ResAttn(nn.Module):
    """A ResBlock optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the residual block, then attention if present."""
        return self.attn(self.res(x, emb))

    def dual(self, x: Dual, emb: Dual) -> Dual:
        h = self.res.dual(x, emb)
        return h if isinstance(self.attn, nn.Identity) else self.attn.dual(h)


class _Level(nn.Module):
    """The blocks of one resolution level and the resampling that follows them."""

    def __init__(self, blocks: list[_ResAttn], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Double the spatial size."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def dual(self, x: Dual) -> Dual:
        return D.conv(self.conv, D.apply_linear(lambda u: F.interpolate(u, scale_factor=2.0, mode="nearest"), x))


class UNet(nn.Module):
    """DDPM++/ADM-style U-Net mapping (x [B,C,H,W], t [B] in [0,1]) to [B,out_channels,H,W]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (),
        num_heads: int = 1,
        dropout: float = 0.0,
        zero_init_out: bool = True,
        groups: int = 32,
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        attn_resolutions = tuple(attn_resolutions)
        _validate(in_channels, out_channels, image_size, channels, channel_mult, num_res_blocks,
                  attn_resolutions, num_heads, dropout, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size

        emb_dim = 4 * channels
        half = channels // 2
        # Frequencies as a buffer so .double()/.to(device) carry them and forward does not rebuild them.
        self.register_buffer("freqs", timestep_frequencies(channels), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(2 * half, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(in_channels, channels, 3, padding=1)

        def attn(ch: int, res: int) -> AttentionBlock | None:
            return AttentionBlock(ch, num_heads, groups) if res in attn_resolutions else None

        # Encoder: record the channel count of every stored activation for the decoder's skips.
        skip_chs = [channels]
        ch, res = channels, image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(_ResAttn(ResBlock(ch, channels * mult, emb_dim, dropout, groups),
                                       attn(channels * mult, res)))
                ch = channels * mult
                skip_chs.append(ch)
            down = None
            if i < len(channel_mult) - 1:
                down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                skip_chs.append(ch)
                res //= 2
            self.down.append(_Level(blocks, down))

        self.mid = nn.ModuleList([
            _ResAttn(ResBlock(ch, ch, emb_dim, dropout, groups), AttentionBlock(ch, num_heads, groups)),
            _ResAttn(ResBlock(ch, ch, emb_dim, dropout, groups), None),
        ])

        # Decoder: one extra block per level so every stored encoder activation is consumed once.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                res_block = ResBlock(ch + skip_chs.pop(), channels * mult, emb_dim, dropout, groups)
                blocks.append(_ResAttn(res_block, attn(channels * mult, res)))
                ch = channels * mult
            up = None
            if i > 0:
                up = Upsample(ch)
                res *= 2
            self.up.append(_Level(blocks, up))
        assert not skip_chs and res == image_size

        self.out_norm = GroupNorm32(groups, ch)
        self.out_conv = nn.Conv2d(ch, out_channels, 3, padding=1)
        if zero_init_out:
            # Zero output at init: F(x,t) = x + t*NN starts as the identity and the denoiser at 0.
            zero_init(self.out_conv)

    def time_embedding(self, t: Tensor) -> Tensor:
        """Sinusoidal embedding of 1000*t, shape [B, 2*(channels//2)]."""
        return sinusoidal_time_embedding(t, self.freqs, self.time_mlp[0].weight.dtype)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predict the output for x [B,C,H,W] at times t [B] (a 0-dim t is broadcast over the batch)."""
        t = self._check(x, t)
        return self._body((self.input_conv(x), None), (self.time_mlp(self.time_embedding(t)), None), False)[0]

    def forward_and_time_derivative(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(output, d output / dt) for x [B,C,H,W] held fixed and times t [B]: a hand-written tangent pass
        equal to torch.func.jvp in t, and differentiable in the parameters like it."""
        t = self._check(x, t)
        emb_in = self.time_embedding(t)
        # d/dt [cos(1000 t f), sin(1000 t f)] = 1000 f [-sin, cos]; the tangent of t is 1.
        work = torch.promote_types(t.dtype, torch.float32)
        args = (1000.0 * t.to(work))[:, None] * self.freqs.to(work)
        rate = 1000.0 * self.freqs.to(work)
        d_in = torch.cat([-torch.sin(args) * rate, torch.cos(args) * rate], dim=-1).to(emb_in.dtype)
        emb = D.linear(self.time_mlp[2], D.silu(D.linear(self.time_mlp[0], (emb_in, d_in))))
        out, tangent = self._body((self.input_conv(x), None), emb, True)
        return out, torch.zeros_like(out) if tangent is None else tangent

    def _body(self, h: Dual, emb: Dual, dual: bool) -> Dual:
        """Everything after the input convolution, on (value, tangent) pairs; with dual=False the tangents
        are not computed and the plain modules run (one topology for both passes)."""
        if dual:
            block = lambda m, x: m.dual(x, emb)
            resample = lambda m, x: m.dual(x) if isinstance(m, Upsample) else D.conv(m, x)
            out_norm, silu, out_conv = (lambda x: D.group_norm(self.out_norm, x)), D.silu, \
                (lambda x: D.conv(self.out_conv, x))
        else:
            block = lambda m, x: (m(x[0], emb[0]), None)
            resample = lambda m, x: (m(x[0]), None)
            out_norm = lambda x: (self.out_norm(x[0]), None)
            silu = lambda x: (F.silu(x[0]), None)
            out_conv = lambda x: (self.out_conv(x[0]), None)
        hs = [h]
        for level in self.down:
            for b in level.blocks:
                h = block(b, h)
                hs.append(h)
            if level.resample is not None:
                h = resample(level.resample, h)
                hs.append(h)
        for b in self.mid:
            h = block(b, h)
        for level in self.up:
            for b in level.blocks:
                h = block(b, D.cat([h, hs.pop()], dim=1))
            if level.resample is not None:
                h = resample(level.resample, h)
        return out_conv(silu(out_norm(h)))

    def _check(self, x: Tensor, t: Tensor) -> Tensor:
        """Validate the inputs; t as [B]."""
        return check_input("UNet", x, t, self.in_channels, self.image_size)


def _validate(
    in_channels: int,
    out_channels: int,
    image_size: int,
    channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attn_resolutions: tuple[int, ...],
    num_heads: int,
    dropout: float,
    groups: int,
) -> None:
    """Raise ValueError for hyper-parameters that cannot build a consistent U-Net."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {channel_mult}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if channels < 2:
        raise ValueError(f"channels must be >= 2 (the time embedding needs it), got {channels}")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(
            f"image_size {image_size} must be divisible by 2**(len(channel_mult)-1) = {factor} "
            f"for channel_mult {channel_mult}"
        )
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    for ch in {channels} | {channels * m for m in channel_mult}:
        if ch % groups:
            raise ValueError(f"channel count {ch} (channels*channel_mult) not divisible by groups={groups}")
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    bad = [r for r in attn_resolutions if r not in resolutions]
    if bad:
        raise ValueError(f"attn_resolutions {bad} do not occur; resolutions of this U-Net are {resolutions}")
    attn_chs = {channels * channel_mult[-1]} | {
        channels * m for m, r in zip(channel_mult, resolutions, strict=True) if r in attn_resolutions
    }
    if num_heads < 1 or any(ch % num_heads for ch in attn_chs):
        raise ValueError(f"num_heads={num_heads} must divide the attention channel counts {sorted(attn_chs)}")
    check_dropout(dropout)


def build_unet(size: str, in_channels: int, out_channels: int, image_size: int, **overrides: Any) -> UNet:
    """Build the UNet preset `size` from UNET_SIZES, with keyword overrides."""
    if "attn_levels" in overrides and "attn_resolutions" in overrides:
        raise ValueError("give attn_levels or attn_resolutions, not both")
    cfg = preset(UNET_SIZES, size, "U-Net", overrides)
    levels = cfg.pop("attn_levels", None)
    # An explicit attn_resolutions override wins over a preset's attn_levels.
    if levels is not None and "attn_resolutions" not in overrides:
        n = len(cfg.get("channel_mult", inspect.signature(UNet).parameters["channel_mult"].default))
        if any(not -n <= lvl < n for lvl in levels):
            raise ValueError(f"attn_levels {levels} out of range for {n} levels")
        cfg["attn_resolutions"] = tuple(image_size // 2 ** (lvl % n) for lvl in levels)
    return UNet(in_channels, out_channels, image_size, **cfg)
