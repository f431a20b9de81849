"""latent-ndm: Neural Diffusion Models in pixel space and in the latent space of an end-to-end VAE.

    from latent_ndm import load_pipeline
    pipe = load_pipeline("runs/ndm_mnist")          # a run directory or a saved model, pixel or latent
    images = pipe.sample(16, sampler="ancestral", steps=100)

The public names below are imported on first use, so that `python -m latent_ndm.data.writer` and
friends do not pay for the whole library. The layout is described in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NDM": "latent_ndm.core.ndm",
    "Denoiser": "latent_ndm.core.ndm",
    "NDMLoss": "latent_ndm.core.loss",
    "ImageModel": "latent_ndm.core.model",
    "PixelCodec": "latent_ndm.core.codec",
    "LatentCodec": "latent_ndm.core.codec",
    "Noise": "latent_ndm.core.noise",
    "SAMPLERS": "latent_ndm.sampling.samplers",
    "NDMPipeline": "latent_ndm.pipeline",
    "load_pipeline": "latent_ndm.pipeline",
    "load_run": "latent_ndm.tasks.runs",
    "build_ndm": "latent_ndm.nets.build",
    "load_config": "latent_ndm.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'latent_ndm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
