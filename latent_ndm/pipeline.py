"""The Python API for a trained model, pixel-space or latent: load, sample, bits/dim, save.

    pipe = NDMPipeline.from_pretrained("runs/ndm_mnist")           # a run directory or a saved model
    images = pipe.sample(16, sampler="ode_heun", steps=50, generator=torch.Generator().manual_seed(0))
    pipe.nelbo_bpd(images)                                          # {'bpd': ..., 'rec_bpd': ..., ...}
    pipe.save_pretrained("models/ndm_mnist")                        # config.json + model.safetensors

    pipe = LatentNDMPipeline.from_pretrained("runs/latent_ndm_mnist_joint")   # VAE + NDM prior
    z = pipe.encode(images)                                         # normalised latents (posterior mean)
    pipe.decode(z)                                                  # uint8 images
    pipe.nelbo_bpd(images), pipe.ode_nll_bpd(images)                # the full model, bits/dim of the images
    pipe.save_pretrained("models/latent_mnist")                     # config.json + vae/ + prior.safetensors

    load_pipeline(path)                                             # either kind, from its config.json

Images go in and out as uint8 tensors [N, C, H, W].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from latent_ndm.core.codec import PixelCodec
from latent_ndm.core.ndm import NDM
from latent_ndm.evaluation.nelbo import evaluate_nelbo
from latent_ndm.sampling.ode_nll import evaluate_ode_nll
from latent_ndm.sampling.samplers import sample_images
from latent_ndm.tasks.latent import (
    LatentCodec,
    LatentModel,
    build_latent_model_from,
    evaluate_joint,
    evaluate_joint_ode,
    load_latent_run,
)
from latent_ndm.tasks.pixel import build_model, load_run
from latent_ndm.training.checkpoint import load_weights, read_run_config, save_weights
from vae.model import VAE

from .config import LatentRunConfig, RunConfig, from_dict, to_dict

WEIGHTS = "model.safetensors"
PRIOR_WEIGHTS, VAE_DIR = "prior.safetensors", "vae"  # a saved latent model: config.json + vae/ + prior.safetensors


def _read_config(path: Path) -> dict | None:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} does not exist (expected a run or saved model directory)")
    return read_run_config(path) if (Path(path) / "config.json").is_file() else None


def is_latent(path: str | Path) -> bool:
    """Whether a run or saved model directory holds a latent model (its config is a LatentRunConfig)."""
    data = _read_config(Path(path))
    return data is not None and "vae_path" in data


def load_pipeline(path: str | Path, ema: bool = True, device: str | torch.device = "cpu"
                  ) -> NDMPipeline | LatentNDMPipeline:
    """The pipeline for a run or saved model directory of either kind (pixel or latent)."""
    cls = LatentNDMPipeline if is_latent(path) else NDMPipeline
    return cls.from_pretrained(path, ema=ema, device=device)


class _Pipeline:
    """What pixel and latent pipelines share: uint8 image checks and sampling through `prior` + `codec`."""

    config: RunConfig | LatentRunConfig
    codec: PixelCodec | LatentCodec
    prior: NDM  # the NDM that samples live in (pixels, or latents that the codec decodes)
    last_nfe: dict  # {'nfe_xhat', 'nfe_f'} per batch of the last `sample`

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return (d.channels, d.image_size, d.image_size)

    @torch.no_grad()
    def sample(self, n: int, sampler: str = "ancestral", steps: int | None = None,
               generator: torch.Generator | None = None, batch_size: int = 256) -> Tensor:
        """n uint8 images [n, C, H, W] from the named sampler (see latent_ndm.sampling.samplers.SAMPLERS); the
        function evaluations per batch are in `last_nfe`."""
        x, self.last_nfe = sample_images(self.prior, n, sampler, steps, generator, batch_size)
        return torch.cat([self.codec.decode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    def _check(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [N, C, H, W], got {images.dtype}")
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape [N, {', '.join(map(str, self.image_shape))}], "
                             f"got {tuple(images.shape)}")
        return images


class NDMPipeline(_Pipeline):
    """A trained pixel-space NDM (or baseline) with its configuration and codec."""

    def __init__(self, model: NDM, config: RunConfig):
        self.model, self.config, self.codec = model.eval(), config, PixelCodec()
        self.prior = self.model

    @classmethod
    def from_pretrained(cls, path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> NDMPipeline:
        """Load a directory written by `save_pretrained`, or a training run (its latest checkpoint,
        EMA weights unless ema=False)."""
        path = Path(path)
        if is_latent(path):
            raise ValueError(f"{path} holds a latent model: load it with LatentNDMPipeline (or load_pipeline)")
        if (path / WEIGHTS).is_file() and (path / "config.json").is_file():
            cfg = from_dict(RunConfig, read_run_config(path))
            model = build_model(cfg)
            load_weights(model, path / WEIGHTS)
        elif (path / "config.json").is_file():
            cfg, model = load_run(path, ema=ema)
        else:
            raise FileNotFoundError(f"{path} is neither a saved model (config.json + {WEIGHTS}) nor a run directory")
        return cls(model.to(device), cfg)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(to_dict(self.config), indent=2))
        save_weights(self.model, path / WEIGHTS, metadata={"format": "latent-ndm"})
        return path

    def nelbo_bpd(self, images: Tensor, num_steps: int | None = None, repeats: int = 1, seed: int = 0,
                  ids: Tensor | None = None, batch_size: int = 250, progress: bool = False) -> dict:
        """Mean NELBO in bits/dim per term; num_steps = T, 0 for continuous time, None for the model's own.
        ids (default 0..N-1) key each image's noise."""
        return evaluate_nelbo(self.model, self._check(images), self.codec, num_steps, batch_size, repeats, seed,
                              progress, ids)

    def ode_nll_bpd(self, images: Tensor, probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                    seed: int = 0, batch_size: int = 100, progress: bool = False) -> dict:
        """Exact NLL in bits/dim through the probability-flow ODE (dequantised, +7 bits for 0..255)."""
        return evaluate_ode_nll(self.model, self._check(images), self.codec, batch_size, probes, seed, rtol, atol,
                                progress)


class LatentNDMPipeline(_Pipeline):
    """A trained latent model (LSGM-style): the VAE's encoder and decoder with an NDM prior on its
    normalised latents. Saved as config.json (its LatentRunConfig) + vae/ (the VAE's own format) +
    prior.safetensors (the NDM)."""

    def __init__(self, model: LatentModel, config: LatentRunConfig):
        self.model, self.config = model.eval(), config
        self.codec, self.prior = LatentCodec(model.vae), model.ndm

    @classmethod
    def from_pretrained(cls, path: str | Path, ema: bool = True,
                        device: str | torch.device = "cpu") -> LatentNDMPipeline:
        """Load a directory written by `save_pretrained`, or a latent training run (its latest checkpoint,
        EMA weights unless ema=False; the VAE's architecture is read from the run's vae_path)."""
        path = Path(path)
        data = _read_config(path)
        if data is not None and (path / PRIOR_WEIGHTS).is_file() and (path / VAE_DIR).is_dir():
            cfg = from_dict(LatentRunConfig, data)
            model = build_latent_model_from(cfg, path / VAE_DIR)
            load_weights(model.ndm, path / PRIOR_WEIGHTS)
        elif data is not None:
            cfg, model = load_latent_run(path, ema=ema)
        else:
            raise FileNotFoundError(f"{path} is neither a saved latent model (config.json + {VAE_DIR}/ + "
                                    f"{PRIOR_WEIGHTS}) nor a run directory")
        return cls(model.to(device), cfg)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # The config keeps the training run's vae_path (provenance); loading reads the VAE from vae/.
        (path / "config.json").write_text(json.dumps(to_dict(self.config), indent=2))
        self.model.vae.save_pretrained(path / VAE_DIR)
        save_weights(self.model.ndm, path / PRIOR_WEIGHTS, metadata={"format": "latent-ndm-prior"})
        return path

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.vae.latent_shape(self.config.data.image_size)

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               batch_size: int = 256) -> Tensor:
        """Normalised latents [N, c, h, w] of uint8 images: the posterior mean of q(z0|x), or one draw
        from it with sample=True."""
        self._check(images)
        device = self.model.vae.latent_shift.device
        out = []
        for start in range(0, len(images), batch_size):
            q = self.model.vae.encode(VAE.from_uint8(images[start : start + batch_size].to(device)))
            out.append(q.sample(generator) if sample else q.mean)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 256) -> Tensor:
        """uint8 images [N, C, H, W] from normalised latents [N, c, h, w] (the decoder's mean image)."""
        if not torch.is_floating_point(latents) or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents must be float [N, {', '.join(map(str, self.latent_shape))}], "
                             f"got {latents.dtype} {tuple(latents.shape)}")
        device = self.model.vae.latent_shift.device
        return torch.cat([self.codec.decode(latents[i : i + batch_size].to(device))
                          for i in range(0, len(latents), batch_size)])

    def nelbo_bpd(self, images: Tensor, num_steps: int | None = None, repeats: int = 1, seed: int = 0,
                  ids: Tensor | None = None, batch_size: int = 250, progress: bool = False) -> dict:
        """The full model's mean NELBO in bits per image dimension, per term ('decoder', 'log_q' and the
        prior's 'rec', 'diff', 'prior') and in total; num_steps = the prior's T, 0 for continuous time,
        None for its own. ids (default 0..N-1) key each image's noise."""
        ids = torch.arange(len(images)) if ids is None else ids
        return evaluate_joint(self.model, self._check(images), ids, num_steps, batch_size, repeats, seed,
                              progress=progress)

    def ode_nll_bpd(self, images: Tensor, probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                    seed: int = 0, ids: Tensor | None = None, batch_size: int = 100, progress: bool = False) -> dict:
        """The full model's bound with the prior's exact ODE NLL in place of its NELBO, in bits per image
        dimension, with NFE and time (see latent.evaluate_joint_ode); with the same seed and ids it uses
        the same z0 as `nelbo_bpd`."""
        return evaluate_joint_ode(self.model, self._check(images), ids, batch_size, probes, seed=seed, rtol=rtol,
                                  atol=atol, progress=progress)
