"""The pixel-space NDM (or its F = identity baseline): the NDM on 8-bit pixels through `PixelCodec`."""

from __future__ import annotations

import math

import torch

from latent_ndm.config import RunConfig
from latent_ndm.core.codec import PixelCodec
from latent_ndm.core.model import ImageModel
from latent_ndm.nets.build import build_loss, build_ndm
from latent_ndm.tasks.diffusion import NELBOObjective, diffusion_task
from latent_ndm.training.loop import Task


def build_pixel_model(cfg: RunConfig) -> ImageModel:
    return ImageModel(PixelCodec(), build_ndm(cfg.model, cfg.data.channels, cfg.data.image_size))


def pixel_task(cfg: RunConfig) -> Task:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_pixel_model(cfg)
    dims = math.prod(model.ndm.data_shape)
    return diffusion_task(cfg, model, NELBOObjective(build_loss(cfg.model), dims))
