"""LSGM's options for the latent prior: mixed prediction, the theta-only reweighting, KL annealing, a frozen VAE."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import perturbed

from latent_ndm.config import ConfigError, LatentRunConfig, load_config
from latent_ndm.core import process as P
from latent_ndm.core.codec import LatentCodec
from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.model import ImageModel
from latent_ndm.core.ndm import NDM, Denoiser
from latent_ndm.core.noise import Noise
from latent_ndm.core.schedules import CosineGamma, LearnedGamma, LinearGamma
from latent_ndm.core.transforms import NeuralTransform
from latent_ndm.nets.build import build_loss, build_ndm
from latent_ndm.nets.unet import UNet
from latent_ndm.tasks.diffusion import NELBOObjective
from latent_ndm.tasks.latent import latent_task
from latent_ndm.training.loop import train
from vae.config import VAEConfig
from vae.model import VAE

TINY_VAE = VAEConfig(in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=2, groups=4, num_mixtures=2)
NETS = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "groups=4")]


def unet(channels: int = 2) -> UNet:
    return UNet(channels, channels, 4, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4)


def test_mixed_prediction_is_lsgms_eps_mixture() -> None:
    torch.manual_seed(0)
    net = perturbed(unet(), 0)
    z, t = torch.randn(3, 2, 4, 4), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    gamma = LinearGamma(-10.0, 5.0)(t)
    alpha, sigma = (P.expand(c, z) for c in P.alpha_sigma(gamma))
    plain = Denoiser(net, "eps")
    mixed = Denoiser(net, "eps", mixing_channels=2)
    with torch.no_grad():
        mixed.mixing_logit.copy_(torch.tensor([-1.0, 2.0]))
        a = torch.sigmoid(mixed.mixing_logit).view(1, 2, 1, 1)
        eps_net = net(z, t.float())
        # LSGM: eps = (1 - a) sigma_t z_t + a eps_net; as a data prediction xhat = (z - sigma eps) / alpha.
        eps_mixed = (1 - a) * sigma * z + a * eps_net
        torch.testing.assert_close(mixed(z, t, gamma), (z - sigma * eps_mixed) / alpha)
        torch.testing.assert_close(plain(z, t, gamma), (z - sigma * eps_net) / alpha)
        # a -> 0: the N(0, I) optimum E[x | z_t] = alpha_t z_t, whatever the network says.
        mixed.mixing_logit.fill_(-40.0)
        torch.testing.assert_close(mixed(z, t, gamma), alpha * z)


class _Given(Noise):
    """Noise whose draws are given: the normals in the order asked for, and the uniforms u."""

    def __init__(self, u: torch.Tensor, *normals: torch.Tensor):
        super().__init__([], [])
        self.u, self.normals = u, list(normals)

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        out = self.normals.pop(0)
        assert out.shape == like.shape and out.dtype == like.dtype
        return out

    def uniform(self, device: torch.device) -> torch.Tensor:
        return self.u


def _grads(model: NDM, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, T: int, weighting: str = "elbo",
           weight=None) -> dict:
    """L_diff's gradients through the loss (`NDMLoss(theta_weighting=weighting)`) at times t and noise eps."""
    model.zero_grad()
    u = t if T == 0 else t - 0.5 / T  # the loss maps u to the grid point ((u T).floor() + 1) / T = t
    eps_0 = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    diff = NDMLoss(theta_weighting=weighting)(model, x, _Given(u, eps_0, eps), T)["diff"]
    (diff if weight is None else diff * weight).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, diff.detach()


@pytest.mark.parametrize("weighting", ["eps_mse", "sigmoid"])
@pytest.mark.parametrize("T", [0, 10])
def test_theta_weighting_reweights_theta_only(T: int, weighting: str) -> None:
    torch.manual_seed(0)
    model = NDM(LearnedGamma(-10.0, 5.0, hidden=16), NeuralTransform(perturbed(unet(), 1)),
                Denoiser(perturbed(unet(), 2), "eps", mixing_channels=2), "gaussian", T).double()
    x, eps = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9] if T == 0 else [0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    elbo, value = _grads(model, x, t, eps, T)
    reweighted, value_rw = _grads(model, x, t, eps, T, weighting)
    # The weight, independently. eps_mse: (gamma(1) - gamma(0)) / gamma'(t) by central differences, or its
    # discrete analogue (gamma(1) - gamma(0)) / (T (gamma(t) - gamma(t - 1/T))); sigmoid: 1 / (1 + e^-(gamma + 2)).
    with torch.no_grad():
        g = model.schedule
        span = g(torch.ones(1, dtype=torch.float64)) - g(torch.zeros(1, dtype=torch.float64))
        h = 1e-6
        rate = (g(t + h) - g(t - h)) / (2 * h) if T == 0 else T * (g(t) - g(t - 1 / T))
        r = span / rate if weighting == "eps_mse" else 1 / (1 + torch.exp(-(g(t) + 2.0)))
    assert r.max() / r.min() > 1.4  # the reweighting is non-trivial
    expected_theta, _ = _grads(model, x, t, eps, T, weight=r)
    torch.testing.assert_close(value_rw, value)  # the reported loss is still the bound
    for name in elbo:
        want = expected_theta[name] if name.startswith("denoiser.") else elbo[name]
        torch.testing.assert_close(reweighted[name], want, rtol=1e-6, atol=1e-9, msg=name)


def test_eps_mse_weighting_is_the_elbo_for_a_linear_schedule() -> None:
    torch.manual_seed(0)
    model = NDM(CosineGamma(-10.0, 5.0), NeuralTransform(perturbed(unet(), 1)),
                Denoiser(perturbed(unet(), 2), "eps"), "gaussian", 0).double()
    x, eps = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    elbo, _ = _grads(model, x, t, eps, 0)
    rw, _ = _grads(model, x, t, eps, 0, "eps_mse")
    assert not torch.allclose(rw["denoiser.net.input_conv.weight"], elbo["denoiser.net.input_conv.weight"])  # cosine
    model.schedule = LinearGamma(-10.0, 5.0)  # gamma' constant: r = 1 at every t
    elbo, _ = _grads(model, x, t, eps, 0)
    rw, _ = _grads(model, x, t, eps, 0, "eps_mse")
    for name in elbo:
        torch.testing.assert_close(rw[name], elbo[name], msg=name)


def test_eps_mse_with_a_linear_schedule_is_refused_as_the_bound_itself() -> None:
    with pytest.raises(ConfigError, match="is the bound itself"):
        load_config("configs/latent_ndm_mnist.yaml", ["model.theta_weighting=eps_mse"], schema=LatentRunConfig)
    cfg = load_config("configs/latent_ndm_mnist.yaml", ["model.theta_weighting=eps_mse", "model.schedule.kind=cosine"],
                      schema=LatentRunConfig)
    assert cfg.model.theta_weighting == "eps_mse"


def test_eps_mse_weight_averages_one_only_for_the_linear_schedule() -> None:
    """r = (gamma(1) - gamma(0)) / gamma'(t) (NDMLoss.theta_grad_scale) has E_t[r] = 1 for the linear schedule;
    for the cosine one, with u(t) = u0 + (u1 - u0) t and gamma' = 2 pi (u1 - u0) / sin(pi u), the closed form
    E_t[r] = (gamma1 - gamma0)(cos pi u0 - cos pi u1) / (2 pi^2 (u1 - u0)^2): about 2.05 for -13.3..5, not
    normalised (it rescales theta's step size only). The discrete analogue T (gamma(t) - gamma(s)) gives 1 too."""
    loss = NDMLoss(theta_weighting="eps_mse")
    t = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000  # midpoint rule on [0, 1]
    linear = NDM(LinearGamma(-13.3, 5.0), NeuralTransform(unet()), Denoiser(unet()), "gaussian", 0)
    torch.testing.assert_close(loss.theta_grad_scale(linear, t, 0), torch.ones_like(t))
    grid = torch.arange(1, 11, dtype=torch.float64) / 10
    torch.testing.assert_close(loss.theta_grad_scale(linear, grid, 10), torch.ones_like(grid))
    cosine = NDM(CosineGamma(-13.3, 5.0), NeuralTransform(unet()), Denoiser(unet()), "gaussian", 0)
    u0, u1 = cosine.schedule.u0, cosine.schedule.u1
    expect = 18.3 * (math.cos(math.pi * u0) - math.cos(math.pi * u1)) / (2 * math.pi**2 * (u1 - u0) ** 2)
    mean = loss.theta_grad_scale(cosine, t, 0).mean().item()
    assert mean == pytest.approx(expect, rel=1e-8) and 2.0 < mean < 2.1
    with torch.no_grad():  # no gradient taken: no reweighting at all
        assert loss.theta_grad_scale(cosine, t[:4], 0) is None
    assert NDMLoss().theta_grad_scale(cosine, t[:4], 0) is None


def _latent_model(cfg_overrides: list[str], freeze: bool = False) -> tuple[ImageModel, NDMLoss]:
    """The latent model of the config and its training loss (t proposal, theta weighting)."""
    cfg = load_config("configs/latent_ndm_mnist.yaml", NETS + cfg_overrides, schema=LatentRunConfig)
    model = ImageModel(LatentCodec(VAE(TINY_VAE), frozen=freeze), build_ndm(cfg.model, 2, 4))
    perturbed(model.ndm, 3, 0.01)  # open F's zero-initialised last layer
    return model, build_loss(cfg.model)


def test_kl_annealing_weights_the_vaes_gradient_and_not_the_priors() -> None:
    torch.manual_seed(0)
    model, loss = _latent_model(["model.mixing=true"])
    model.eval()  # eval: no dropout or adaptive t-proposal between calls
    loss.eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    noise = lambda: Noise.per_example(range(4), "cpu", 0)  # noqa: E731
    w = 0.3

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    weighted = model.nelbo_terms(images, noise(), loss, kl_weight=w)
    plain = model.nelbo_terms(images, noise(), loss)
    assert set(plain) == {"decoder", "log_q", "rec", "diff", "prior"}
    for k in plain:  # the values are the bound's terms either way
        torch.testing.assert_close(weighted[k], plain[k].detach())
    g_weighted = grads(sum(weighted.values()))
    # Independently: decoder + w (log_q + prior terms) for the VAE; the unweighted NELBO for the prior.
    terms = model.nelbo_terms(images, noise(), loss)
    g_vae = grads(terms["decoder"] + w * sum(v for k, v in terms.items() if k != "decoder"))
    g_prior = grads(sum(model.nelbo_terms(images, noise(), loss).values()))
    assert g_weighted.keys() == g_prior.keys() and any(n.startswith("codec.vae.") for n in g_weighted)
    for name, g in g_weighted.items():
        want = g_vae[name] if name.startswith("codec.vae.") else g_prior[name]
        # float32 sums of opposing terms: compare as vectors (a wrong weight errs by O(1) of the norm)
        assert (g - want).norm() <= 1e-3 * want.norm() + 1e-7, (name, (g - want).norm() / want.norm())
        if name.startswith("codec.vae.encoder"):  # and the weight matters there
            assert (g_prior[name] - want).norm() > 0.05 * want.norm(), name
    objective = NELBOObjective(NDMLoss(), 64, kl_anneal_steps=10, kl_anneal_start=0.1)
    assert [objective.kl_weight(s) for s in (0, 5, 10, 50)] == pytest.approx([0.1, 0.55, 1.0, 1.0])


def test_every_part_gets_gradient_in_stage_three_and_none_reaches_a_frozen_vae() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    model, loss = _latent_model(["model.mixing=true", "model.theta_weighting=sigmoid"])
    assert loss.theta_weighting == "sigmoid"
    nats, _ = NELBOObjective(loss, 64)(model, images, Noise.per_example(range(4), "cpu", 0))
    nats.mean().backward()
    parts = {"encoder": model.codec.vae.encoder, "decoder": model.codec.vae.decoder, "theta": model.ndm.denoiser.net,
             "phi": model.ndm.transform}
    for name, part in parts.items():
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert model.ndm.denoiser.mixing_logit.grad.abs().min() > 0  # every channel's mixing weight

    frozen, loss = _latent_model(["model.mixing=true"], freeze=True)
    nats, _ = NELBOObjective(loss, 64)(frozen, images, Noise.per_example(range(4), "cpu", 0))
    nats.mean().backward()
    assert all(p.grad is None for p in frozen.codec.vae.parameters())
    assert all(p.grad is not None for p in frozen.ndm.parameters())


def test_stage_three_with_a_frozen_vae_leaves_it_unchanged(tmp_path: Path, mnist_shards: Path) -> None:
    torch.manual_seed(0)
    vae_dir = VAE(TINY_VAE).save_pretrained(tmp_path / "vae")
    cfg = load_config("configs/latent_ndm_mnist.yaml", [
        f"out_dir={tmp_path}", "name=f", f"vae_path={vae_dir}", "stage=joint", "freeze_vae=true",
        "model.mixing=true", f"data.shards={mnist_shards}", "data.num_workers=0", "train.steps=3",
        "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0", "train.sample_every=0",
        "train.ckpt_every=3", "eval.final_examples=8", *NETS], schema=LatentRunConfig)
    task = latent_task(cfg)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    train(cfg, task)
    after = task.model.state_dict()
    assert any(k.startswith("codec.vae.") for k in before)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("codec.vae."))
    assert not torch.equal(after["ndm.denoiser.mixing_logit"], before["ndm.denoiser.mixing_logit"])
    with pytest.raises(ConfigError, match="KL annealing"):
        load_config("configs/latent_ndm_mnist.yaml", ["stage=joint", "freeze_vae=true", "kl_anneal_steps=5"],
                    schema=LatentRunConfig)
