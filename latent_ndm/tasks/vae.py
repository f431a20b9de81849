"""Stage 1: training the VAE of vae/ through the shared loop and the sharded data pipeline.

Two decoder losses (vae.decoder):
- discrete: the per-example NELBO in nats, -log p(x|z) under an 8-bit likelihood + beta KL(q||N(0,I))
  (beta ramps to loss.kl_weight; at 1 it is the true bound, reported in bits/dim);
- perceptual (LDM): per-pixel L1 + LPIPS, beta KL, and optionally a patch-GAN whose generator loss
  is scaled by LDM's adaptive weight, starting at loss.gan_start_step.
The discriminator lives inside the trained module (one optimizer, one data-parallel wrapper); its
parameters see only the hinge loss (the generator loss reaches them through detached copies).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from latent_ndm.config import VAERunConfig
from latent_ndm.core.codec import pixels_to_model
from latent_ndm.core.noise import Noise
from latent_ndm.data.streams import cached_eval_examples, eval_examples, train_batches
from latent_ndm.evaluation.nelbo import gather_examples
from latent_ndm.training.loop import Task
from vae.config import VAELossConfig
from vae.model import VAE
from vae.perceptual import (
    PatchDiscriminator,
    adaptive_weight,
    disc_factor,
    generator_loss,
    hinge_d_loss,
    load_lpips,
    lpips_distance,
)

EXPORT = "vae"  # runs/NAME/vae/: the trained VAE as a saved model (VAE.from_pretrained)


class VAETrainer(nn.Module):
    """The VAE plus, for the GAN, its discriminator: everything the optimizer updates."""

    def __init__(self, vae: VAE, loss: VAELossConfig):
        super().__init__()
        self.vae = vae
        self.discriminator = None
        if vae.config.decoder == "perceptual" and loss.gan_weight > 0:
            self.discriminator = PatchDiscriminator(vae.config.in_channels, loss.disc_channels, loss.disc_layers)

    def forward(self, x: Tensor, noise: Noise) -> dict[str, Tensor]:
        posterior = self.vae.posterior_raw(x)
        z = posterior.reparameterize(noise.normal(posterior.mean))
        output = self.vae.decoder_output(z)
        lik = self.vae.likelihood
        # The discrete decoder's exact mean costs 256 evaluations per pixel: monitor with the cheap estimate.
        recon = self.vae.reconstruction(output, exact=False) if lik is not None else self.vae.reconstruction(output)
        out = {"kl": posterior.kl(), "output": output, "recon": recon,
               "rec": lik.nll(output, x) if lik is not None else x.new_zeros(len(x))}
        if self.discriminator is not None:
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            out["logits_fake_g"] = functional_call(self.discriminator, frozen, (out["recon"],))
            out["logits_real"] = self.discriminator(x)
            out["logits_fake_d"] = self.discriminator(out["recon"].detach())
        return out


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-example PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - y).double().square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


class VAEObjective:
    """Per-example loss of a batch of uint8 images (nats for the discrete decoder) and its metrics."""

    def __init__(self, cfg: VAERunConfig, lpips: nn.Module | None):
        self.cfg, self.lpips = cfg, lpips
        self.dims = cfg.data.channels * cfg.data.image_size**2
        self.latent_dims = cfg.vae.latent_channels * (cfg.data.image_size // cfg.vae.factor) ** 2
        self.discrete = cfg.vae.decoder == "discrete"
        # Discrete: optimise bits/dim. Perceptual: mean per-pixel loss (LDM's units divided by D).
        self.loss_scale = 1.0 / (self.dims * math.log(2)) if self.discrete else 1.0 / self.dims

    def kl_weight(self, step: int) -> float:
        lc = self.cfg.loss
        return lc.kl_weight * (min(1.0, step / lc.kl_warmup_steps) if lc.kl_warmup_steps > 0 else 1.0)

    def __call__(self, model: nn.Module, images: Tensor, noise: Noise, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        lc, x = self.cfg.loss, pixels_to_model(images)
        out = model(x, noise)
        beta = self.kl_weight(step)
        metrics = {"kl_per_dim": out["kl"].detach().mean() / self.latent_dims,
                   "psnr": psnr(out["recon"].detach(), x).mean(), "kl_weight": torch.tensor(beta, device=x.device)}
        if self.discrete:
            nelbo = out["rec"] + out["kl"]
            metrics["bpd"] = nelbo.detach().mean() / (self.dims * math.log(2))
            return out["rec"] + beta * out["kl"], metrics
        # Perceptual: per-example sums over pixels (LPIPS, one number per image, counts at every pixel).
        rec = lc.l1_weight * (x - out["output"]).abs().flatten(1).sum(1)
        if self.lpips is not None and lc.lpips_weight > 0:
            dist = lpips_distance(self.lpips.to(x.device), x, out["output"])
            rec = rec + lc.lpips_weight * self.dims * dist
            metrics["lpips"] = dist.detach().mean()
        total = rec + beta * out["kl"]
        if "logits_real" in out:
            factor = disc_factor(step, lc.gan_start_step)
            g = generator_loss(out["logits_fake_g"])
            weight = adaptive_weight(rec.mean(), g.mean(), _raw(model).vae.last_layer) if factor > 0 \
                else torch.zeros((), device=x.device)
            d = hinge_d_loss(out["logits_real"], out["logits_fake_d"])
            # Multiplied by 0 before the start step rather than skipped: every parameter must get a
            # gradient each step under data parallelism.
            total = total + (factor * lc.gan_weight * weight * g + factor * d) * self.dims
            metrics |= {"g_loss": g.detach().mean(), "d_loss": d.detach().mean(), "adaptive_weight": weight}
        return total, metrics


def _raw(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate_vae(vae: VAE, images: Tensor, ids: Tensor, cfg: VAERunConfig, lpips: nn.Module | None = None,
                 distributed: bool = False, batch_size: int = 250) -> dict[str, float]:
    """Test metrics: NELBO bits/dim (discrete decoder, one posterior sample keyed by example id),
    reconstruction PSNR of the posterior mean, KL per latent dimension, LPIPS when available."""
    was_training = vae.training
    vae.eval()
    device = vae.latent_shift.device
    terms: dict[str, list[Tensor]] = {"rec": [], "kl": [], "psnr": [], "lpips": []}
    for start in range(0, len(images), batch_size):
        x = pixels_to_model(images[start : start + batch_size].to(device))
        posterior = vae.posterior_raw(x)
        noise = Noise.per_example(ids[start : start + len(x)].tolist(), device, cfg.eval.seed, "vae")
        z = posterior.reparameterize(noise.normal(posterior.mean))
        lik = vae.likelihood
        terms["rec"].append((lik.nll(vae.decoder_output(z), x) if lik is not None else x.new_zeros(len(x))).cpu())
        terms["kl"].append(posterior.kl().cpu())
        recon = vae.reconstruction(vae.decoder_output(posterior.mean))
        terms["psnr"].append(psnr(recon, x).cpu())
        terms["lpips"].append((lpips_distance(lpips, x, recon) if lpips is not None else x.new_zeros(len(x))).cpu())
    vae.train(was_training)
    per = {k: torch.cat(v).double() if v else torch.zeros(0, dtype=torch.float64) for k, v in terms.items()}
    if distributed:
        ids, per = gather_examples(ids, per)
    dims = cfg.data.channels * cfg.data.image_size**2
    latent_dims = cfg.vae.latent_channels * (cfg.data.image_size // cfg.vae.factor) ** 2
    out = {"psnr": per["psnr"].mean().item(), "kl_per_dim": per["kl"].mean().item() / latent_dims,
           "num_images": len(per["kl"])}
    if vae.likelihood is not None:
        nelbo = (per["rec"] + per["kl"]) / (dims * math.log(2))
        out |= {"bpd": nelbo.mean().item(), "bpd_stderr": nelbo.std().item() / math.sqrt(len(nelbo)),
                "rec_bpd": (per["rec"] / (dims * math.log(2))).mean().item(),
                "kl_bpd": (per["kl"] / (dims * math.log(2))).mean().item()}
    if lpips is not None:
        out["lpips"] = per["lpips"].mean().item()
    return out


def vae_task(cfg: VAERunConfig) -> Task:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    vae = VAE(cfg.vae)
    lpips = None
    if cfg.vae.decoder == "perceptual" and cfg.loss.lpips_weight > 0:
        lpips = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_random_backbone)
    model = VAETrainer(vae, cfg.loss)
    objective = VAEObjective(cfg, lpips)
    test_examples = cached_eval_examples(cfg.data, cfg.train.eval_examples)
    def device_lpips(device: torch.device) -> nn.Module | None:
        return lpips.to(device) if lpips is not None else None

    def stream(start_step: int):
        return train_batches(cfg.data, cfg.train.batch_size, cfg.train.seed, start_step)

    def evaluate(m: VAETrainer) -> dict[str, float]:
        images, ids = test_examples()
        return evaluate_vae(m.vae, images, ids, cfg, device_lpips(m.vae.latent_shift.device), distributed=True)

    def sample(m: VAETrainer, generator: torch.Generator) -> Tensor:
        """8 evenly spaced test images (top row) over their reconstructions from the posterior mean."""
        images, _, _ = eval_examples(cfg.data, "test", 8, 0, 1)
        x = pixels_to_model(images.to(m.vae.latent_shift.device))
        with torch.no_grad():
            recon = m.vae.reconstruction(m.vae.decoder_output(m.vae.posterior_raw(x).mean))
        return torch.cat([images, VAE.to_uint8(recon).cpu()])

    def finish(m: VAETrainer, run_dir: Path) -> None:
        """Latent statistics from training images, the exported model, and a full test report."""
        vae_out = VAE(cfg.vae).to(m.vae.latent_shift.device)
        vae_out.load_state_dict(m.vae.state_dict())
        batches = (pixels_to_model(b.images) for b in train_batches(cfg.data, 256, cfg.train.seed, 0, 0, 1))
        vae_out.fit_latent_stats(batches, max_batches=20)
        vae_out.save_pretrained(run_dir / EXPORT)
        images, ids, skipped = eval_examples(cfg.data, "test", cfg.eval.final_examples, 0, 1)
        report = evaluate_vae(vae_out, images, ids, cfg, device_lpips(vae_out.latent_shift.device))
        report |= {"skipped_unreadable": skipped, "latent_shift": vae_out.latent_shift.tolist(),
                   "latent_scale": vae_out.latent_scale.tolist()}
        (run_dir / "test_report.json").write_text(json.dumps(report, indent=2) + "\n")

    return Task(model, objective, stream, evaluate, sample, sample_nrow=8, finish=finish)
