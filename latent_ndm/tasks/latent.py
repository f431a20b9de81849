"""The latent model, LSGM-style (docs/MATH.md, section 11): a VAE's encoder q(z0|x) and decoder p(x|z0)
with an NDM prior on z0, as an `ImageModel(LatentCodec(vae), ndm)`.

Stage 2 (cfg.stage = prior): the NDM prior on the frozen VAE's latents, one fresh z0 ~ q(z0|x) per step
(or drawn from pre-encoded posteriors, cfg.latents). Stage 3 (joint): encoder, decoder, theta and phi
together on the whole model's NELBO, with its own learning rate for the VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from latent_ndm.config import LatentRunConfig
from latent_ndm.core.codec import LatentCodec
from latent_ndm.core.model import ImageModel
from latent_ndm.data.latent_shards import open_latent_shards
from latent_ndm.nets.build import build_loss, build_ndm
from latent_ndm.tasks.diffusion import NELBOObjective, diffusion_task
from latent_ndm.training.checkpoint import load_state, run_weights
from latent_ndm.training.loop import Task
from vae.model import VAE


def build_latent_model(cfg: LatentRunConfig, vae_path: str | Path | None = None) -> ImageModel:
    """The VAE from `vae_path` (default cfg.vae_path) and a freshly initialised NDM prior on its latents."""
    path = Path(cfg.vae_path if vae_path is None else vae_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the VAE {path} is missing (a latent run reads its VAE from vae_path, relative "
                                "to the directory training ran in)")
    vae = VAE.from_pretrained(path)
    c, h, w = vae.latent_shape(cfg.data.image_size)
    if h != w:
        raise ValueError(f"latents must be square, got {h}x{w}")
    codec = LatentCodec(vae, frozen=cfg.stage == "prior" or cfg.freeze_vae)
    return ImageModel(codec, build_ndm(cfg.model, c, h))


def latent_task(cfg: LatentRunConfig) -> Task:
    torch.manual_seed(cfg.train.seed)
    model = build_latent_model(cfg)
    kl_steps = cfg.kl_anneal_steps if cfg.stage == "joint" else 0
    objective = NELBOObjective(build_loss(cfg.model), cfg.data.channels * cfg.data.image_size**2, kl_steps,
                               cfg.kl_anneal_start)
    if cfg.init_from:  # e.g. stage 3 from stage 2: its EMA weights and its t proposal
        path, weights, state = run_weights(cfg.init_from, with_state=True)  # weights and state of one checkpoint
        load_state(model, weights, path)
        if "objective" in state:
            objective.load_state_dict(state["objective"])
        else:  # a run from before the loss held the proposal: it travelled in the EMA weights, as then
            objective.load_legacy_proposal(weights)
    image_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    vae = model.codec.vae
    latents = open_latent_shards(cfg.latents, vae, image_shape, cfg.data.shards) if cfg.latents else None

    def param_groups(m: nn.Module) -> list[dict]:
        # Stage 3: separate learning rates for the VAE and the prior, both on the true bound (the VAE
        # always on the likelihood weighting).
        if cfg.stage == "prior" or cfg.freeze_vae:
            return [{"params": list(m.ndm.parameters())}]
        return [{"params": list(m.codec.vae.parameters()), "lr": cfg.vae_lr}, {"params": list(m.ndm.parameters())}]

    return diffusion_task(cfg, model, objective, latents, param_groups)
