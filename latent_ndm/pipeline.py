"""The Python API for a trained pixel-space model: load, sample, bits/dim, save.

    pipe = NDMPipeline.from_pretrained("runs/ndm_mnist")           # a run directory or a saved model
    images = pipe.sample(16, sampler="ode_heun", steps=50, generator=torch.Generator().manual_seed(0))
    pipe.nelbo_bpd(images)                                          # {'bpd': ..., 'rec_bpd': ..., ...}
    pipe.save_pretrained("models/ndm_mnist")                        # config.json + model.safetensors

Images go in and out as uint8 tensors [N, C, H, W].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import load_weights, save_weights
from .codec import PixelCodec
from .config import RunConfig, from_dict, to_dict
from .evaluate import evaluate_nelbo
from .experiment import build_model, load_run
from .likelihood import evaluate_ode_nll
from .ndm import NDM
from .samplers import sample_images

WEIGHTS = "model.safetensors"


class NDMPipeline:
    """A trained NDM (or baseline) with its configuration and codec."""

    def __init__(self, model: NDM, config: RunConfig):
        self.model, self.config, self.codec = model.eval(), config, PixelCodec()

    @classmethod
    def from_pretrained(cls, path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> NDMPipeline:
        """Load a directory written by `save_pretrained`, or a training run (its latest checkpoint,
        EMA weights unless ema=False)."""
        path = Path(path)
        if (path / WEIGHTS).is_file() and (path / "config.json").is_file():
            cfg = from_dict(RunConfig, json.loads((path / "config.json").read_text()))
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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return (d.channels, d.image_size, d.image_size)

    def sample(self, n: int, sampler: str = "ancestral", steps: int | None = None,
               generator: torch.Generator | None = None, batch_size: int = 256) -> Tensor:
        """n uint8 images [n, C, H, W] from the named sampler (see latent_ndm.samplers.SAMPLERS)."""
        x, self.last_nfe = sample_images(self.model, n, sampler, steps, generator, batch_size)
        return self.codec.decode(x)

    def _check(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [N, C, H, W], got {images.dtype}")
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape [N, {', '.join(map(str, self.image_shape))}], "
                             f"got {tuple(images.shape)}")
        return images

    def nelbo_bpd(self, images: Tensor, num_steps: int | None = None, repeats: int = 1, seed: int = 0) -> dict:
        """Mean NELBO in bits/dim per term; num_steps = T, 0 for continuous time, None for the model's own."""
        return evaluate_nelbo(self.model, self._check(images), self.codec, num_steps, repeats=repeats, seed=seed)

    def ode_nll_bpd(self, images: Tensor, probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                    seed: int = 0) -> dict:
        """Exact NLL in bits/dim through the probability-flow ODE (dequantised, +7 bits for 0..255)."""
        return evaluate_ode_nll(self.model, self._check(images), self.codec, probes=probes, rtol=rtol,
                                atol=atol, seed=seed)
