"""The latent model, LSGM-style: a VAE's encoder q(z0|x) and decoder p(x|z0) with an NDM prior on z0.

Per example (SPEC.md, latent model), in nats:
    NELBO(x) = E_q[-log p(x|z0)] + E_q[log q(z0|x)] + E_q[NELBO_NDM(z0)],
estimated with one z0 ~ q(z0|x) per example. z0 is the VAE's normalised latent (its stored
per-channel shift and scale); log q is taken in the same units, so the bound is exact whatever the
normalisation. The NDM is the same module as in pixel space, with its Gaussian data likelihood.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vae.model import VAE

from .checkpoint import latest_checkpoint, load_weights
from .config import LatentRunConfig
from .data import cached_eval_examples, eval_examples, train_batches
from .evaluate import gather_examples
from .ndm import NDM, build_ndm
from .noise import Noise
from .process import bits_per_dim
from .samplers import ancestral
from .train import Task


class LatentCodec:
    """uint8 images <-> normalised VAE latents (the codec boundary for latent models)."""

    likelihood = "gaussian"

    def __init__(self, vae: VAE):
        self.vae = vae

    def encode(self, images: Tensor, noise: Noise | None = None) -> Tensor:
        """One latent sample per image (noise keyed as in training, or fresh draws)."""
        posterior = self.vae.encode(VAE.from_uint8(images))
        eps = noise.normal(posterior.mean) if noise is not None else torch.randn_like(posterior.mean)
        return posterior.mean + posterior.std * eps

    def decode(self, latents: Tensor) -> Tensor:
        return VAE.to_uint8(self.vae.decode(latents))


class StandardNormalPrior(nn.Module):
    """p(z0) = N(0, I) in the NDM's place: the joint bound then reduces to the VAE's own NELBO."""

    def forward(self, z: Tensor, noise: Noise | None = None, num_steps: int | None = None) -> dict[str, Tensor]:
        nll = 0.5 * (z.double().square() + math.log(2 * math.pi)).flatten(1).sum(1)
        return {"prior": nll}


def joint_nelbo(vae: VAE, prior: nn.Module, images: Tensor, noise: Noise,
                num_steps: int | None = None) -> dict[str, Tensor]:
    """Per-example terms of the full model's NELBO in nats, each [B]:
    'decoder' = -log p(x|z0), 'log_q' = log q(z0|x), and the prior's own terms (the NDM's 'rec',
    'diff', 'prior'). Their sum is the bound. `prior` is an NDM (or StandardNormalPrior)."""
    x = VAE.from_uint8(images)
    posterior = vae.posterior(x)  # over normalised latents; x is valid by construction
    z0 = posterior.mean + posterior.std * noise.normal(posterior.mean)
    raw = vae.denormalize(z0)
    if vae.likelihood is None:
        raise ValueError("the full model's bits/dim needs the VAE's discrete decoder (vae.decoder=discrete)")
    decoder = vae.likelihood.nll(vae.decoder_output(raw), x)
    terms = {"decoder": decoder.double(), "log_q": posterior.log_prob(z0).double()}
    prior_terms = prior(z0, noise, num_steps)  # NDM.forward is its NELBO
    return terms | {k: v.double() for k, v in prior_terms.items()}


class LatentModel(nn.Module):
    """VAE + NDM prior: what the latent training loop holds. In stage 2 the VAE is frozen."""

    def __init__(self, vae: VAE, ndm: NDM, freeze_vae: bool = True):
        super().__init__()
        self.vae, self.ndm = vae, ndm
        if freeze_vae:
            self.vae.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LatentModel:
        super().train(mode)
        if not any(p.requires_grad for p in self.vae.parameters()):
            self.vae.eval()  # a frozen VAE stays in eval mode (no dropout)
        return self

    def forward(self, images: Tensor, noise: Noise, num_steps: int | None = None) -> dict[str, Tensor]:
        return joint_nelbo(self.vae, self.ndm, images, noise, num_steps)


def load_vae(path: str | Path) -> VAE:
    vae = VAE.from_pretrained(path)
    if vae.likelihood is None:
        raise ValueError(f"{path}: the latent NDM needs a VAE with the discrete decoder (vae.decoder=discrete), "
                         "so that the full model has a NELBO in bits/dim")
    return vae


def build_latent_model(cfg: LatentRunConfig) -> LatentModel:
    """The VAE from cfg.vae_path and a fresh NDM prior, or both from cfg.init_from's latest EMA weights."""
    vae = load_vae(cfg.vae_path)
    c, h, w = vae.latent_shape(cfg.data.image_size)
    if h != w:
        raise ValueError(f"latents must be square, got {h}x{w}")
    model = LatentModel(vae, build_ndm(cfg.model, c, h), freeze_vae=cfg.stage == "prior")
    if cfg.init_from:
        ckpt = latest_checkpoint(Path(cfg.init_from))
        if ckpt is None:
            raise FileNotFoundError(f"init_from={cfg.init_from} has no complete checkpoint")
        name = "ema" if (ckpt / "ema.safetensors").is_file() else "model"
        load_weights(model, ckpt / f"{name}.safetensors")
    return model


class JointObjective:
    """The full model's per-example NELBO in nats; optimised in bits per pixel dimension."""

    def __init__(self, dims: int):
        self.dims = dims
        self.loss_scale = 1.0 / (dims * math.log(2))

    def __call__(self, model: nn.Module, images: Tensor, noise: Noise, step: int = 0
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = model(images, noise)
        nats = sum(terms.values())
        metrics = {f"{k}_bpd": v.detach().mean() * self.loss_scale for k, v in terms.items()}
        return nats, metrics | {"bpd": nats.detach().mean() * self.loss_scale}


@torch.no_grad()
def evaluate_joint(model: LatentModel, images: Tensor, ids: Tensor, num_steps: int | None = None,
                   batch_size: int = 250, repeats: int = 1, seed: int = 1234,
                   distributed: bool = False, progress: bool = False) -> dict[str, float]:
    """The full model's test NELBO in bits/dim of the images, per term and in total, with its standard
    error; each example's noise keyed by its id (independent of batching and process count)."""
    was_training = model.training
    model.eval()
    device = model.vae.latent_shift.device
    per: dict[str, Tensor] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="joint nelbo", disable=not progress, leave=False):
        x = images[start : start + batch_size].to(device)
        for r in range(repeats):
            noise = Noise.per_example(ids[start : start + len(x)].tolist(), device, seed, "joint", r)
            for k, v in model(x, noise, num_steps).items():
                per.setdefault(k, torch.zeros(len(images), dtype=torch.float64))[start : start + len(x)] += \
                    v.cpu() / repeats
    model.train(was_training)
    if distributed:
        ids, per = gather_examples(ids, per)
    if not per or len(ids) == 0:
        raise ValueError("no test images to evaluate")
    dims = images[0].numel()
    total = sum(per.values())
    out = {f"{k}_bpd": bits_per_dim(v, dims).mean().item() for k, v in per.items()}
    out["bpd"] = bits_per_dim(total, dims).mean().item()
    out["bpd_stderr"] = bits_per_dim(total, dims).std().item() / math.sqrt(len(total))
    out["prior_nelbo_bpd"] = sum(out[f"{k}_bpd"] for k in ("rec", "diff", "prior") if f"{k}_bpd" in out)
    out["num_steps"] = model.ndm.num_steps if num_steps is None else num_steps
    out["num_images"] = len(total)
    return out


def latent_task(cfg: LatentRunConfig) -> Task:
    """Stage 2 (cfg.stage = prior): the NDM prior on the frozen VAE's latents, one fresh z0 ~ q(z0|x) per
    step. Stage 3 (joint): encoder, decoder, theta and phi together on the full model's NELBO."""
    torch.manual_seed(cfg.train.seed)
    model = build_latent_model(cfg)
    dims = cfg.data.channels * cfg.data.image_size**2
    test_examples = cached_eval_examples(cfg.data, cfg.train.eval_examples)

    def stream(start_step: int):
        return train_batches(cfg.data, cfg.train.batch_size, cfg.train.seed, start_step)

    def evaluate(m: LatentModel) -> dict[str, float]:
        images, ids = test_examples()
        return evaluate_joint(m, images, ids, cfg.eval.num_steps, cfg.eval.batch_size, cfg.eval.repeats,
                              cfg.eval.seed, distributed=True)

    def sample(m: LatentModel, generator: torch.Generator) -> Tensor:
        was_training = m.training
        m.eval()
        c, h, w = m.vae.latent_shape(cfg.data.image_size)
        z = ancestral(m.ndm, (cfg.train.num_samples, c, h, w), generator, cfg.train.sample_steps).x
        images = LatentCodec(m.vae).decode(z)
        m.train(was_training)
        return images

    def finish(m: LatentModel, run_dir: Path) -> None:
        images, ids, skipped = eval_examples(cfg.data, "test", cfg.eval.final_examples, 0, 1)
        report = {"nelbo": evaluate_joint(m, images, ids, cfg.eval.num_steps, cfg.eval.batch_size,
                                          cfg.eval.repeats, cfg.eval.seed), "skipped_unreadable": skipped}
        (run_dir / "test_report.json").write_text(json.dumps(report, indent=2) + "\n")

    def param_groups(m: nn.Module) -> list[dict]:
        # Stage 3: separate learning rates for the VAE and the prior, both on the true bound (the
        # VAE always on the likelihood weighting).
        raw = m.module if hasattr(m, "module") else m
        if cfg.stage == "prior":
            return [{"params": list(raw.ndm.parameters())}]
        return [{"params": list(raw.vae.parameters()), "lr": cfg.vae_lr}, {"params": list(raw.ndm.parameters())}]

    return Task(model, JointObjective(dims), stream, evaluate, sample, finish=finish, param_groups=param_groups)
