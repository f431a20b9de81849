"""The one place where a network config's `arch` name becomes a network (denoiser or NN inside F)."""

from __future__ import annotations

from typing import Any

from torch import nn

from latent_ndm.config import NET_ARCH_KEYS, NetConfig
from latent_ndm.nets.unet import build_unet


def build_net(cfg: NetConfig, in_channels: int, out_channels: int, image_size: int, **extra: Any) -> nn.Module:
    """The preset `cfg.size` of architecture `cfg.arch` (unet: UNET_SIZES, dit: DIT_SIZES) with the config's
    overrides, then `extra` on top. Either maps (x [B,in,H,W], t [B]) to [B,out,H,W]."""
    overrides = cfg.overrides() | extra
    if cfg.arch == "unet":
        return build_unet(cfg.size, in_channels, out_channels, image_size, **overrides)
    if cfg.arch == "dit":
        # Imported here: timm pulls in torchvision (~4 s at start-up), which U-Net runs need not pay.
        from latent_ndm.nets.dit import build_dit

        return build_dit(cfg.size, in_channels, out_channels, image_size, **overrides)
    raise ValueError(f"unknown network arch {cfg.arch!r}; choose one of {', '.join(NET_ARCH_KEYS)}")
