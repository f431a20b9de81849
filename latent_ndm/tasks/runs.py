"""Loading what a training run made: its config (pixel, latent or VAE run) and its model."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from latent_ndm.config import LatentRunConfig, RunConfig, from_dict, run_schema
from latent_ndm.core.model import ImageModel
from latent_ndm.tasks.latent import build_latent_model
from latent_ndm.tasks.pixel import build_pixel_model
from latent_ndm.training.checkpoint import (
    MANIFEST,
    load_state,
    read_run_config,
    run_weights,
    verify_checkpoint,
    weights_name,
)


def run_config(run_dir: str | Path) -> RunConfig | LatentRunConfig:
    """The resolved config a run directory was trained with."""
    data = read_run_config(run_dir)
    return from_dict(run_schema(data), data)


def build_model(cfg: RunConfig | LatentRunConfig, vae_path: str | Path | None = None) -> ImageModel:
    """An untrained model of cfg's architecture (a latent model's VAE from `vae_path`, default cfg.vae_path)."""
    if isinstance(cfg, LatentRunConfig):
        return build_latent_model(cfg, vae_path)
    if isinstance(cfg, RunConfig):
        return build_pixel_model(cfg)
    raise ValueError(f"{cfg.name} is a {cfg.kind} run, not a diffusion model (load a VAE with VAE.from_pretrained)")


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is one checkpoint of a run (RUN/checkpoints/step_N with its manifest)."""
    path = Path(path)
    return path.parent.name == "checkpoints" and path.name.startswith("step_") and (path / MANIFEST).is_file()


def load_run(path: str | Path, ema: bool = True) -> tuple[RunConfig | LatentRunConfig, ImageModel]:
    """The config and model of a pixel or latent run directory, from its latest complete checkpoint, or of one
    checkpoint of it (RUN/checkpoints/step_N, e.g. an early one to guide sampling with), verified against its
    manifest; EMA weights by default. A latent checkpoint holds the VAE's weights too (stage 3 trains them);
    the VAE's architecture is read from the run's vae_path."""
    if is_checkpoint(path):
        ckpt = Path(path)
        cfg = run_config(ckpt.parent.parent)
        path = ckpt / weights_name(verify_checkpoint(ckpt)["files"], ema)
        weights = load_file(str(path))
    else:
        cfg = run_config(path)
        path, weights, _ = run_weights(path, ema)  # safe while the run still trains: see read_newest
    model = build_model(cfg)
    load_state(model, weights, path)
    return cfg, model.eval()
