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
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latent_ndm.config import LatentRunConfig, from_dict
from latent_ndm.core.ndm import NDM, build_ndm
from latent_ndm.core.noise import Noise
from latent_ndm.core.process import bits_per_dim, scale_grad
from latent_ndm.data.latent_shards import open_latent_shards
from latent_ndm.data.streams import cached_eval_examples, eval_examples, train_batches
from latent_ndm.evaluation.nelbo import gather_examples
from latent_ndm.sampling.ode_nll import ode_nll
from latent_ndm.sampling.samplers import ancestral
from latent_ndm.training.checkpoint import load_weights, read_run_config, run_weights
from latent_ndm.training.loop import Task
from vae.distributions import DiagonalGaussian
from vae.model import VAE


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
                num_steps: int | None = None, kl_weight: float = 1.0) -> dict[str, Tensor]:
    """Per-example terms of the full model's NELBO in nats, each [B]:
    'decoder' = -log p(x|z0), 'log_q' = log q(z0|x), and the prior's own terms (the NDM's 'rec',
    'diff', 'prior'). Their sum is the bound. `prior` is an NDM (or StandardNormalPrior).

    kl_weight (KL annealing) changes gradients only: the VAE is trained on decoder + w (log_q + prior
    NELBO) while the prior's own parameters keep the unweighted gradient of its NELBO (LSGM trains the
    prior on its cross-entropy term unweighted); the returned values are the bound's terms."""
    x = VAE.from_uint8(images)
    posterior = vae.posterior(x)  # over normalised latents; x is valid by construction
    z0 = posterior.mean + posterior.std * noise.normal(posterior.mean)
    raw = vae.denormalize(z0)
    if vae.likelihood is None:
        raise ValueError("the full model's bits/dim needs the VAE's discrete decoder (vae.decoder=discrete)")
    decoder = vae.likelihood.nll(vae.decoder_output(raw), x)
    log_q = posterior.log_prob(z0)
    if kl_weight != 1.0:
        w = torch.full((len(x),), kl_weight, device=x.device)
        log_q, z0 = scale_grad(log_q, w), scale_grad(z0, w)
    terms = {"decoder": decoder.double(), "log_q": log_q.double()}
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

    def forward(self, images: Tensor, noise: Noise, num_steps: int | None = None,
                kl_weight: float = 1.0, pre_encoded: bool = False) -> dict[str, Tensor]:
        if pre_encoded:  # `images` are stored posterior parameters: the prior's terms, no VAE (see the end)
            return prior_nelbo_of_posterior(self.ndm, images, noise, num_steps)
        return joint_nelbo(self.vae, self.ndm, images, noise, num_steps, kl_weight)


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
    model = LatentModel(vae, build_ndm(cfg.model, c, h), freeze_vae=cfg.stage == "prior" or cfg.freeze_vae)
    if cfg.init_from:
        load_weights(model, run_weights(cfg.init_from))  # its EMA weights
    return model


class JointObjective:
    """The full model's per-example NELBO in nats; optimised in bits per pixel dimension.

    With KL annealing (stage 3) the weight of log q + the prior's NELBO in the VAE's gradient rises
    linearly from `kl_anneal_start` to 1 over `kl_anneal_steps` (see joint_nelbo); the logged bits/dim
    are always the true bound."""

    def __init__(self, dims: int, kl_anneal_steps: int = 0, kl_anneal_start: float = 1.0):
        self.dims = dims
        self.loss_scale = 1.0 / (dims * math.log(2))
        self.kl_anneal_steps, self.kl_anneal_start = kl_anneal_steps, kl_anneal_start

    def kl_weight(self, step: int) -> float:
        if self.kl_anneal_steps <= 0 or step >= self.kl_anneal_steps:
            return 1.0
        return self.kl_anneal_start + (1.0 - self.kl_anneal_start) * step / self.kl_anneal_steps

    def __call__(self, model: nn.Module, images: Tensor, noise: Noise, step: int = 0
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        kl_weight = self.kl_weight(step)
        terms = model(images, noise, kl_weight=kl_weight)
        nats = sum(terms.values())
        metrics = {f"{k}_bpd": v.detach().mean() * self.loss_scale for k, v in terms.items()}
        if self.kl_anneal_steps:
            metrics["kl_weight"] = torch.tensor(kl_weight)
        return nats, metrics | {"bpd": nats.detach().mean() * self.loss_scale}


@torch.no_grad()
def evaluate_joint(model: LatentModel, images: Tensor, ids: Tensor, num_steps: int | None = None,
                   batch_size: int = 250, repeats: int = 1, seed: int = 1234,
                   distributed: bool = False, progress: bool = False) -> dict[str, float]:
    """The full model's test NELBO in bits/dim of the images, per term and in total, with its standard
    error; each example's noise keyed by its id (independent of batching and process count)."""
    was_training = model.training
    model.eval()
    per = joint_per_example(model.vae, model.ndm, images, ids, num_steps, batch_size, repeats, seed, progress)
    model.train(was_training)
    if distributed:
        ids, per = gather_examples(ids, per)
    out = _joint_bpd(per, ids, math.prod(images.shape[1:]))
    out["prior_nelbo_bpd"] = sum(out[f"{k}_bpd"] for k in ("rec", "diff", "prior") if f"{k}_bpd" in out)
    out["num_steps"] = model.ndm.num_steps if num_steps is None else num_steps
    return out


def latent_task(cfg: LatentRunConfig) -> Task:
    """Stage 2 (cfg.stage = prior): the NDM prior on the frozen VAE's latents, one fresh z0 ~ q(z0|x) per
    step. Stage 3 (joint): encoder, decoder, theta and phi together on the full model's NELBO."""
    torch.manual_seed(cfg.train.seed)
    model = build_latent_model(cfg)
    dims = cfg.data.channels * cfg.data.image_size**2
    test_examples = cached_eval_examples(cfg.data, cfg.train.eval_examples)
    # cfg.latents: the lane stream reads pre-encoded posteriors instead of images (checked against this VAE).
    image_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    latents = open_latent_shards(cfg.latents, model.vae, image_shape, cfg.data.shards) if cfg.latents else None

    def stream(start_step: int):
        return train_batches(cfg.data, cfg.train.batch_size, cfg.train.seed, start_step, shards=latents)

    def evaluate(m: LatentModel) -> dict[str, float]:
        images, ids = test_examples()
        return evaluate_joint(m, images, ids, cfg.eval.num_steps, cfg.eval.batch_size, cfg.eval.repeats,
                              cfg.eval.seed, distributed=True)

    def sample(m: LatentModel, generator: torch.Generator) -> Tensor:
        was_training = m.training
        m.eval()
        c, h, w = m.vae.latent_shape(cfg.data.image_size)
        z = ancestral(m.ndm, (cfg.train.num_samples, c, h, w), generator,
                      min(cfg.train.sample_steps, m.ndm.num_steps or math.inf)).x
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
        if cfg.stage == "prior" or cfg.freeze_vae:
            return [{"params": list(raw.ndm.parameters())}]
        return [{"params": list(raw.vae.parameters()), "lr": cfg.vae_lr}, {"params": list(raw.ndm.parameters())}]

    objective = PreEncodedPriorObjective(dims) if cfg.latents else \
        JointObjective(dims, cfg.kl_anneal_steps if cfg.stage == "joint" else 0, cfg.kl_anneal_start)
    return Task(model, objective, stream, evaluate, sample, finish=finish, param_groups=param_groups)


# -- evaluation helpers, the ODE variant of the bound, and loading trained latent models -------------------


def joint_per_example(vae: VAE, prior, images: Tensor, ids: Tensor, num_steps: int | None = None,
                      batch_size: int = 250, repeats: int = 1, seed: int = 1234,
                      progress: bool = False) -> dict[str, Tensor]:
    """`joint_nelbo`'s terms per example, float64 [N] nats, each the mean of `repeats` draws. Example i's
    noise is keyed by (seed, 'joint', repeat, ids[i]), so it gets the same z0 ~ q(z0|x) whatever the prior
    and the batching; the prior draws whatever it needs after that z0."""
    device = vae.latent_shift.device
    per: dict[str, Tensor] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="joint bound", disable=not progress, leave=False):
        x = images[start : start + batch_size].to(device)
        for r in range(repeats):
            noise = Noise.per_example(ids[start : start + len(x)].tolist(), device, seed, "joint", r)
            for k, v in joint_nelbo(vae, prior, x, noise, num_steps).items():
                per.setdefault(k, torch.zeros(len(images), dtype=torch.float64))[start : start + len(x)] += \
                    v.detach().cpu() / repeats
    return per


def _joint_bpd(per: dict[str, Tensor], ids: Tensor, dims: int) -> dict[str, float]:
    """Mean bits per image dimension of each term and of their sum, with the sum's standard error."""
    if not per or len(ids) == 0:
        raise ValueError("no test images to evaluate")
    total = sum(per.values())
    out = {f"{k}_bpd": bits_per_dim(v, dims).mean().item() for k, v in per.items()}
    out["bpd"] = bits_per_dim(total, dims).mean().item()
    out["bpd_stderr"] = bits_per_dim(total, dims).std().item() / math.sqrt(len(total))
    out["num_images"] = len(total)
    return out


class ODEPrior:
    """The NDM prior's exact -log p(z0) by its probability-flow ODE (`likelihood.ode_nll`), in the prior's
    place in `joint_nelbo`: {'prior_nll': nats [B]}. z0 is continuous, so nothing is dequantised. The
    Hutchinson probes come from each example's keyed noise (after its z0); the adaptive solver's steps are
    shared by a batch, so results depend on the batching only within the solver's tolerance."""

    def __init__(self, ndm: NDM, probes: int = 1, probe_kind: str = "rademacher", rtol: float = 1e-5,
                 atol: float = 1e-5):
        if probe_kind not in ("rademacher", "gaussian"):
            raise ValueError(f"probe_kind must be 'rademacher' or 'gaussian', got {probe_kind!r}")
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        self.ndm, self.probes, self.probe_kind, self.rtol, self.atol = ndm, probes, probe_kind, rtol, atol
        self.nfe: list[int] = []  # drift evaluations of each solve

    def __call__(self, z0: Tensor, noise: Noise, num_steps: int | None = None) -> dict[str, Tensor]:
        eps = torch.stack([noise.normal(z0) for _ in range(self.probes)])  # [K, B, c, h, w]
        if self.probe_kind == "rademacher":
            eps = torch.where(eps < 0, -1.0, 1.0).to(z0.dtype)
        nats, info = ode_nll(self.ndm, z0.detach(), probes=self.probes, dequantize=False, rtol=self.rtol,
                             atol=self.atol, probe_vectors=eps)
        self.nfe.append(info["nfe"])
        return {"prior_nll": nats}


@torch.no_grad()
def evaluate_joint_ode(model: LatentModel, images: Tensor, ids: Tensor | None = None, batch_size: int = 100,
                       probes: int = 1, probe_kind: str = "rademacher", seed: int = 1234, rtol: float = 1e-5,
                       atol: float = 1e-5, progress: bool = False) -> dict[str, float]:
    """The full model's bound with the prior's ODE NLL in place of its NELBO (SPEC.md, latent model), in bits
    per image dimension: per example -log p(x|z0) + log q(z0|x) - log p_ODE(z0) at one z0 ~ q(z0|x).

    z0 is keyed as in `evaluate_joint`'s first repeat: with the same seed and ids, 'decoder' and 'log_q'
    are exactly its terms. Reports each term ('prior_nll_bpd' is the prior's), the total with its standard
    error, the mean NFE per batch (each a drift plus `probes` vector-Jacobian products) and the time."""
    ids = torch.arange(len(images)) if ids is None else ids
    was_training = model.training
    model.eval()
    prior = ODEPrior(model.ndm, probes, probe_kind, rtol, atol)
    t0 = time.perf_counter()
    per = joint_per_example(model.vae, prior, images, ids, None, batch_size, 1, seed, progress)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    out = _joint_bpd(per, ids, math.prod(images.shape[1:]))
    return out | {"nfe_mean": sum(prior.nfe) / len(prior.nfe), "seconds": seconds,
                  "seconds_per_image": seconds / len(images), "probes": probes, "probe_kind": probe_kind,
                  "rtol": rtol, "atol": atol}


def build_latent_model_from(cfg: LatentRunConfig, vae_path: str | Path | None = None) -> LatentModel:
    """A LatentModel of cfg's architecture without cfg.init_from's weights: the VAE from `vae_path`
    (default cfg.vae_path), the prior freshly initialised (weights are loaded by the caller)."""
    path = Path(cfg.vae_path if vae_path is None else vae_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the VAE {path} is missing (a latent run reads its VAE's architecture from "
                                "vae_path, relative to the directory training ran in)")
    return build_latent_model(replace(cfg, vae_path=str(path), init_from=""))


def load_latent_run(run_dir: str | Path, ema: bool = True) -> tuple[LatentRunConfig, LatentModel]:
    """The config and full model (VAE + prior) of a latent run directory, from its latest checkpoint
    (EMA weights by default); the checkpoint holds the VAE's weights too, as stage 3 trains them."""
    cfg = from_dict(LatentRunConfig, read_run_config(run_dir))
    weights = run_weights(run_dir, ema)
    model = build_latent_model_from(cfg)
    load_weights(model, weights)
    return cfg, model.eval()


# -- stage 2 on pre-encoded posteriors (scripts/encode_latents.sh, config key `latents`) ---------------------


def prior_nelbo_of_posterior(prior: nn.Module, params: Tensor, noise: Noise,
                             num_steps: int | None = None) -> dict[str, Tensor]:
    """`joint_nelbo` from stored posterior parameters, without the VAE: params [B, 2c, h, w] are the mean and
    log-variance of q(z0|x) over normalised latents. z0 is drawn from `noise` first, as joint_nelbo draws it,
    so the same parameters and noise give the same z0, 'log_q' and prior terms (nats [B]); the decoder's
    -log p(x|z0) is left out (it does not depend on the prior, and with a frozen VAE it is constant)."""
    mean, logvar = params.chunk(2, dim=1)
    posterior = DiagonalGaussian(mean, logvar)
    z0 = posterior.mean + posterior.std * noise.normal(posterior.mean)
    terms = {"log_q": posterior.log_prob(z0).double()}
    return terms | {k: v.double() for k, v in prior(z0, noise, num_steps).items()}


class PreEncodedPriorObjective:
    """Stage 2 on pre-encoded posteriors: log q(z0|x) + the prior's NELBO of a fresh z0 ~ q(z0|x), per
    example in nats, optimised in bits per image dimension. The decoder's term is missing, so this is not
    the full bound: it logs 'prior_nelbo_bpd' (rec + diff + prior), 'log_q_bpd' and each term, never 'bpd';
    the full model's bits/dim come from the evaluation on test images."""

    def __init__(self, dims: int):
        self.dims = dims
        self.loss_scale = 1.0 / (dims * math.log(2))

    def __call__(self, model: nn.Module, params: Tensor, noise: Noise, step: int = 0
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = model(params, noise, pre_encoded=True)  # through the (DDP-)wrapped model's forward
        nats = sum(terms.values())
        metrics = {f"{k}_bpd": v.detach().mean() * self.loss_scale for k, v in terms.items()}
        return nats, metrics | {"prior_nelbo_bpd": (nats - terms["log_q"]).detach().mean() * self.loss_scale}
