"""The Python API for a trained model, pixel-space or latent: load, sample, encode/decode, bits/dim, save.

    pipe = NDMPipeline.from_pretrained("runs/ndm_mnist")           # a run directory or a saved model
    images = pipe.sample(16, sampler="ode_heun", steps=50, generator=torch.Generator().manual_seed(0))
    pipe.nelbo_bpd(images)                                          # {'bpd': ..., 'rec_bpd': ..., ...}
    pipe.ode_nll_bpd(images)                                        # the bound with the exact ODE NLL
    z = pipe.encode(images); pipe.decode(z)                         # model space (latents of a latent model)
    pipe.save_pretrained("models/ndm_mnist")                        # config.json + ndm/ (+ vae/) + run.json

Pixel and latent models are the same class: an `ImageModel` (codec + NDM) and the run config it was trained
with. Images go in and out as uint8 tensors [N, C, H, W]; bits are per image dimension.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from latent_ndm.config import LatentRunConfig, RunConfig, from_dict, run_schema, to_dict
from latent_ndm.core.codec import LatentCodec, PixelCodec, check_images
from latent_ndm.core.model import ImageModel
from latent_ndm.core.ndm import NDM
from latent_ndm.evaluation.nelbo import evaluate_nelbo, evaluate_ode_nll
from latent_ndm.sampling.guidance import autoguided
from latent_ndm.sampling.samplers import sample_images
from latent_ndm.tasks.runs import build_model, is_checkpoint, load_run
from latent_ndm.training.checkpoint import load_weights, read_run_config
from vae.model import VAE

CONFIG, RUN, NDM_DIR, VAE_DIR = "config.json", "run.json", "ndm", "vae"


class NDMPipeline:
    """A trained model (pixel or latent) with the configuration it was trained with.

    model: the codec and the NDM; config: the training run's config (its data section says which test
    images the evaluation reads); None when unknown.
    """

    def __init__(self, model: ImageModel, image_shape: tuple[int, int, int],
                 config: RunConfig | LatentRunConfig | None = None):
        self.model, self.image_shape, self.config = model.eval(), tuple(image_shape), config
        self.last_nfe: dict = {}  # {'nfe_xhat', 'nfe_f'} per batch of the last `sample`

    @property
    def ndm(self) -> NDM:
        return self.model.ndm

    @property
    def codec(self) -> PixelCodec | LatentCodec:
        return self.model.codec

    @property
    def is_latent(self) -> bool:
        return isinstance(self.codec, LatentCodec)

    @property
    def model_shape(self) -> tuple[int, ...]:
        """One example's shape in the NDM's space (the image shape, or the VAE's latent shape)."""
        return tuple(self.ndm.data_shape)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device) -> NDMPipeline:
        self.model.to(device)
        return self

    # -- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> NDMPipeline:
        """Load a directory written by `save_pretrained`, or a training run (its latest checkpoint, EMA weights
        unless ema=False), or one checkpoint of a run (RUN/checkpoints/step_N). Models saved by earlier versions
        (a run config.json beside model.safetensors, or beside vae/ + prior.safetensors) load too."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist (expected a run or saved model directory)")
        if is_checkpoint(path):
            config, model = load_run(path, ema)
            d = config.data
            return cls(model, (d.channels, d.image_size, d.image_size), config).to(device)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"{path} is neither a saved model nor a run directory (no {CONFIG})")
        data = read_run_config(path)
        if data.get("class") == "NDMPipeline":
            ndm = NDM.from_pretrained(path / NDM_DIR)
            codec = LatentCodec(VAE.from_pretrained(path / VAE_DIR)) if data["codec"] == "latent" else PixelCodec()
            config = None
            if (path / RUN).is_file():
                run = json.loads((path / RUN).read_text())
                config = from_dict(run_schema(run), run)
            return cls(ImageModel(codec, ndm), data["image_shape"], config).to(device)
        config = from_dict(run_schema(data), data)
        if (path / "checkpoints").is_dir():
            config, model = load_run(path, ema)
        elif (path / "model.safetensors").is_file():  # a pixel model saved by an earlier version
            model = build_model(config)
            load_weights(model, path / "model.safetensors")
        elif (path / "prior.safetensors").is_file() and (path / VAE_DIR).is_dir():  # ... a latent one
            model = build_model(config, path / VAE_DIR)
            load_weights(model.ndm, path / "prior.safetensors")
        else:
            raise FileNotFoundError(f"{path} has a {CONFIG} but neither checkpoints/ nor saved weights")
        d = config.data
        return cls(model, (d.channels, d.image_size, d.image_size), config).to(device)

    def save_pretrained(self, path: str | Path) -> Path:
        """config.json (class, codec, image shape) + ndm/ (the NDM's own config and weights) + vae/ for a latent
        model (the VAE's own format) + run.json (the training run's config, for provenance and test data)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.ndm.save_pretrained(path / NDM_DIR)
        if self.is_latent:
            self.codec.vae.save_pretrained(path / VAE_DIR)
        if self.config is not None:
            (path / RUN).write_text(json.dumps(to_dict(self.config), indent=2))
        meta = {"class": "NDMPipeline", "codec": "latent" if self.is_latent else "pixel",
                "image_shape": list(self.image_shape)}
        (path / CONFIG).write_text(json.dumps(meta, indent=2))  # last: a complete directory has it
        return path

    # -- sampling and the codec -----------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, sampler: str = "ancestral", steps: int | None = None,
               generator: torch.Generator | None = None, batch_size: int = 256, seed: int | None = None,
               temperature: float = 1.0, guide: NDMPipeline | None = None, guidance: float = 2.0) -> Tensor:
        """n uint8 images [n, C, H, W] from the named sampler (see latent_ndm.sampling.samplers.SAMPLERS); the
        function evaluations per batch are in `last_nfe`. temperature: z_1 ~ N(0, temperature^2 I) (below 1:
        cleaner, less diverse samples from the deterministic samplers; see the samplers' module).
        guide: a weaker model of the same space (e.g. an early checkpoint of the run, `load_pipeline(
        "RUN/checkpoints/step_N")`), which the samples are steered away from with weight `guidance`
        (autoguidance, latent_ndm.sampling.guidance); the images are decoded by this model's codec.

        seed: each batch of batch_size draws from its own keyed generator, and under torchrun the processes
        share the batches: the same images for any number of processes. Otherwise `generator` draws all
        (a CPU generator with a GPU model is fine: it draws on the CPU, the same numbers as on a CPU)."""
        ndm = self.ndm if guide is None else autoguided(self.ndm, self._guide_ndm(guide), guidance)
        x, self.last_nfe = sample_images(ndm, n, sampler, steps, generator, batch_size, seed, temperature)
        if guide is not None:  # each xhat evaluation then runs the guide's network too (none at weight 1)
            self.last_nfe["nfe_guide"] = self.last_nfe["nfe_xhat"] if guidance != 1 else 0
        return self.decode(x, batch_size)

    def _guide_ndm(self, guide: NDMPipeline) -> NDM:
        if guide.is_latent != self.is_latent:
            kinds = ["latent" if m.is_latent else "pixel" for m in (guide, self)]
            raise ValueError(f"the guide is a {kinds[0]} model and this one a {kinds[1]}: a guide must model the "
                             "same space")
        return guide.ndm.to(self.device)

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               batch_size: int = 256) -> Tensor:
        """uint8 images -> model space [N, ...]: pixels on the bin centres, or the posterior mean of q(z0|x)
        (one draw from it with sample=True) of a latent model."""
        check_images(images, self.image_shape)
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device)
            if sample and self.is_latent:
                out.append(self.codec.vae.encode(self.codec.vae.from_uint8(batch)).sample(generator))
            else:
                out.append(self.codec.encode_mean(batch))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """uint8 images [N, C, H, W] from model space [N, ...] (a latent model: the decoder's mean image)."""
        if not torch.is_floating_point(x) or tuple(x.shape[1:]) != self.model_shape:
            raise ValueError(f"model-space data must be float [N, {', '.join(map(str, self.model_shape))}], "
                             f"got {x.dtype} {tuple(x.shape)}")
        return torch.cat([self.codec.decode(x[i : i + batch_size].to(self.device)).cpu()
                          for i in range(0, len(x), batch_size)])

    # -- bits/dim ---------------------------------------------------------------------------------------

    def nelbo_bpd(self, images: Tensor, num_steps: int | None = None, repeats: int = 1, seed: int = 0,
                  ids: Tensor | None = None, batch_size: int = 250, progress: bool = False,
                  distributed: bool = False) -> dict:
        """The whole model's mean NELBO in bits per image dimension, per term and in total (a latent model:
        'decoder', 'log_q' and the prior's 'rec', 'diff', 'prior'); num_steps = the NDM's T, 0 for continuous
        time, None for its own. ids (default 0..N-1) key each image's noise. distributed: each process
        passes its share (distinct ids) and all get the figure over the union."""
        return evaluate_nelbo(self.model, check_images(images, self.image_shape), ids, num_steps, batch_size,
                              repeats, seed, distributed, progress)

    def ode_nll_bpd(self, images: Tensor, probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                    seed: int = 0, ids: Tensor | None = None, batch_size: int = 100, progress: bool = False,
                    probe_kind: str = "rademacher", distributed: bool = False, per_image: bool = False) -> dict:
        """The bound with the NDM's exact NLL by its probability-flow ODE in place of its NELBO, in bits per
        image dimension, with NFE and time; with the same seed and ids it uses the same z0 as `nelbo_bpd`."""
        return evaluate_ode_nll(self.model, check_images(images, self.image_shape), ids, batch_size, probes,
                                probe_kind, seed, rtol, atol, progress, distributed, per_image)


def load_pipeline(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> NDMPipeline:
    """The pipeline of a run or saved model directory of either kind (pixel or latent)."""
    return NDMPipeline.from_pretrained(path, ema=ema, device=device)
