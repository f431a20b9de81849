"""Where configs become objects: networks by `arch` name, schedules by `kind`, the NDM and its loss.

`core/` never reads a config; everything that turns a config section into a module lives here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from latent_ndm.config import NET_ARCH_KEYS, ModelConfig, NetConfig, ScheduleConfig, from_dict, to_dict
from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.ndm import NDM, Denoiser
from latent_ndm.core.schedules import CosineGamma, LearnedGamma, LinearGamma, Schedule
from latent_ndm.core.timesteps import ImportanceSampler
from latent_ndm.core.transforms import IdentityTransform, NeuralTransform, SeparableTransform, Transform
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


def build_schedule(cfg: ScheduleConfig) -> Schedule:
    if cfg.kind == "linear":
        return LinearGamma(cfg.gamma_min, cfg.gamma_max)
    if cfg.kind == "cosine":
        return CosineGamma(cfg.gamma_min, cfg.gamma_max)
    if cfg.kind == "learned":
        return LearnedGamma(cfg.gamma_min, cfg.gamma_max, cfg.learned_hidden)
    raise ValueError(f"unknown schedule kind {cfg.kind!r}; choose linear, cosine or learned")


def build_ndm(cfg: ModelConfig, channels: int, image_size: int) -> NDM:
    """An NDM from its config: networks (U-Net or DiT) from the registry for the denoiser and for NN inside F."""
    denoiser = Denoiser(
        build_net(cfg.denoiser, channels, channels, image_size),
        cfg.parameterization,
        mixing_channels=channels if cfg.mixing else 0,
        mixing_logit_init=cfg.mixing_logit_init,
    )
    if cfg.transform == "identity":
        transform: Transform = IdentityTransform()
    else:
        # F must be deterministic: F(x, .) and F(xhat, .) are separate evaluations whose difference is the
        # loss, and independent dropout masks would add an O(1) term that T/v or SNR/gamma' amplifies.
        if cfg.transform == "separable":  # one output group per basis function, no time dependence
            net = build_net(cfg.transform_net, channels, channels * cfg.transform_basis, image_size, dropout=0.0)
            transform = SeparableTransform(net, cfg.transform_basis, cfg.fdot)
        else:
            net = build_net(cfg.transform_net, channels, channels, image_size, dropout=0.0)
            transform = NeuralTransform(net, cfg.fdot)
    ndm = NDM(build_schedule(cfg.schedule), transform, denoiser, cfg.likelihood, cfg.num_steps,
              (channels, image_size, image_size))
    ndm.config = {"model": to_dict(cfg), "channels": channels, "image_size": image_size}  # NDM.save_pretrained
    return ndm


def ndm_from_config(data: dict[str, Any]) -> NDM:
    """The NDM (untrained) that `NDM.save_pretrained` described in its config.json."""
    return build_ndm(from_dict(ModelConfig, data["model"]), int(data["channels"]), int(data["image_size"]))


def build_loss(cfg: ModelConfig) -> NDMLoss:
    """The training loss of an NDM: its t proposal (continuous time) and theta weighting."""
    proposal = None
    if cfg.num_steps == 0 and cfg.importance_sampling:
        proposal = ImportanceSampler(cfg.is_bins, cfg.is_decay, cfg.is_uniform_mix)
    return NDMLoss(proposal, cfg.theta_weighting, cfg.theta_sigmoid_bias)
