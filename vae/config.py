"""The VAE's typed settings: the architecture (saved with every model) and the training loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DECODERS = ("discrete", "perceptual")


@dataclass
class VAEConfig:
    in_channels: int = 1  # image channels (1 or 3)
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2)  # one level per entry; downsampling factor f = 2^(levels - 1)
    num_res_blocks: int = 1  # residual blocks per level
    latent_channels: int = 4
    attention: bool = True  # self-attention in the middle, at the latent resolution
    groups: int = 32  # GroupNorm groups (must divide every width)
    dropout: float = 0.0
    decoder: str = "discrete"  # discrete: a proper 8-bit likelihood (NELBO in bits/dim) | perceptual: L1 + LPIPS
    likelihood: str = "logistic_mixture"  # discrete decoder: logistic_mixture | logistic | gaussian
    num_mixtures: int = 5  # components of the logistic mixture per pixel

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        if self.in_channels < 1 or self.latent_channels < 1 or self.channels < 1 or self.num_res_blocks < 0:
            raise ValueError("vae: in_channels, latent_channels and channels must be >= 1, num_res_blocks >= 0")
        if self.factor not in (1, 2, 4, 8):
            raise ValueError(f"vae.channel_mult has {len(self.channel_mult)} levels: the downsampling factor "
                             f"{self.factor} must be 1, 2, 4 or 8 (1 to 4 levels)")
        widths = {self.channels * m for m in self.channel_mult}
        if any(w % self.groups for w in widths):
            raise ValueError(f"vae.groups={self.groups} must divide every width {sorted(widths)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"vae.decoder={self.decoder!r}; choose one of {', '.join(DECODERS)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown VAE config key(s) {unknown}; valid: {sorted(names)}")
        data = dict(data)
        if "channel_mult" in data:
            data["channel_mult"] = tuple(data["channel_mult"])
        cfg = cls(**data)
        cfg.validate()
        return cfg


@dataclass
class VAELossConfig:
    kl_weight: float = 1.0  # final weight of KL(q(z|x) || N(0, I)); 1 gives the true NELBO
    kl_warmup_steps: int = 0  # the KL weight ramps linearly from 0 over these steps (KL annealing)
    l1_weight: float = 1.0  # perceptual decoder: weight of the per-pixel L1 term
    lpips_weight: float = 1.0  # perceptual decoder: weight of LPIPS (0 disables it)
    lpips_net: str = "vgg"  # vgg | alex | squeeze (backbone weights from the torch hub cache)
    lpips_random_backbone: bool = False  # tests only: a random backbone needs no file but is not perceptual
    gan_weight: float = 0.0  # weight of the patch-GAN generator loss (times the adaptive weight); 0 disables
    gan_start_step: int = 5000  # the discriminator and its loss start here
    disc_channels: int = 64
    disc_layers: int = 3
