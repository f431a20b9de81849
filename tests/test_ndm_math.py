"""The NDM mathematics against closed forms and independent computations (docs/MATH.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import float64, perturbed  # noqa: F401 (fixture)
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from latent_ndm.core import process as P
from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.ndm import NDM, Denoiser
from latent_ndm.core.noise import Noise
from latent_ndm.core.schedules import CosineGamma, LearnedGamma, LinearGamma
from latent_ndm.core.transforms import IdentityTransform, NeuralTransform, SeparableTransform, Transform
from latent_ndm.nets.unet import UNet

pytestmark = pytest.mark.usefixtures("float64")  # closed-form comparisons in float64


class SmoothTransform(Transform):
    """A fixed non-linear F(x, t) = x + t sin(2x + 3t) x with F(x, 0) = x (closed-form test case)."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return x + t * torch.sin(2 * x + 3 * t) * x


class GroupsMLP(nn.Module):
    """A fixed network for a time-separable F on [B, D] data: K groups NN_k(x) = tanh(x W_k), t ignored."""

    def __init__(self, dim: int, groups: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(dim, groups * dim, generator=g, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight)


class ScaleNet(nn.Module):
    """A fixed denoiser network: eps_hat = 0.7 z (x-parameterised: xhat = 0.7 z)."""

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        return 0.7 * z


def ddpm_model(T: int, parameterization: str = "x") -> NDM:
    return NDM(LinearGamma(-13.3, 5.0), IdentityTransform(), Denoiser(ScaleNet(), parameterization), "discrete8bit", T)


def data(b: int = 6, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (b, 1, 4, 4), generator=g)
    return P.bin_centres(dtype=torch.float64)[k]


# -- F = identity reproduces the plain-diffusion (DDPM/VDM) NELBO --------------------------------


def independent_vdm_terms(x: Tensor, t: Tensor, eps: Tensor, eps0: Tensor, T: int, param: str) -> dict[str, Tensor]:
    """VDM's bound written from scratch: SNR(t) = exp(-gamma), gamma linear from -13.3 to 5."""
    g = lambda u: -13.3 + 18.3 * u  # noqa: E731
    a = lambda u: torch.sqrt(torch.sigmoid(-g(u))).view(-1, 1, 1, 1)  # noqa: E731
    sd = lambda u: torch.sqrt(torch.sigmoid(g(u))).view(-1, 1, 1, 1)  # noqa: E731
    snr = lambda u: torch.exp(-g(u))  # noqa: E731
    z_t = a(t) * x + sd(t) * eps
    xhat = 0.7 * z_t if param == "x" else (z_t - sd(t) * 0.7 * z_t) / a(t)
    sq = ((x - xhat) ** 2).flatten(1).sum(1)
    if T > 0:
        s = t - 1.0 / T
        diff = T * 0.5 * (snr(s) - snr(t)) * sq  # DDPM: KL = (SNR(s) - SNR(t)) / 2 ||x - xhat||^2
    else:
        diff = 0.5 * 18.3 * snr(t) * sq  # VDM: -1/2 SNR'(t) ||x - xhat||^2
    # Discrete decoder: normalised Gaussian densities of z_0 at alpha_0 * (bin centres).
    zeros = torch.zeros(len(x))
    z0 = a(zeros) * x + sd(zeros) * eps0
    y = torch.linspace(-1 + 1 / 256, 1 - 1 / 256, 256)
    logits = Normal(a(zeros)[..., None] * y, sd(zeros)[..., None]).log_prob(z0[..., None])
    logp = torch.log_softmax(logits, -1)
    k = torch.round((x + 1) * 128 - 0.5).long()
    rec = -logp.gather(-1, k[..., None]).flatten(1).sum(1)
    ones = torch.ones(len(x))
    prior = kl_divergence(Normal(a(ones) * x, sd(ones)), Normal(0.0, 1.0)).flatten(1).sum(1)
    return {"rec": rec, "diff": diff, "prior": prior}


@pytest.mark.parametrize("param", ["x", "eps"])
@pytest.mark.parametrize("T", [0, 10, 1000])
def test_identity_transform_is_plain_diffusion(T: int, param: str) -> None:
    x = data()
    g = torch.Generator().manual_seed(1)
    eps, eps0 = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]) if T else torch.rand(len(x), generator=g)
    model = ddpm_model(T, param)
    ours = {"rec": model.reconstruction_loss(x, eps0), "diff": model.diffusion_loss(x, t, eps, T),
            "prior": model.prior_loss(x)}
    ref = independent_vdm_terms(x, t, eps, eps0, T, param)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=0)


def test_nelbo_draws_are_reproducible_and_terms_positive() -> None:
    model = ddpm_model(0)
    x = data(8)
    a = NDMLoss()(model, x, torch.Generator().manual_seed(3))
    b = NDMLoss()(model, x, torch.Generator().manual_seed(3))
    for k in a:
        assert a[k].shape == (8,) and torch.equal(a[k], b[k]) and (a[k] >= 0).all()


# -- posterior ----------------------------------------------------------------------------------


def test_posterior_keeps_the_marginals_for_nonlinear_f() -> None:
    """z_t ~ q(z_t|x), then z_s ~ q(z_s|z_t,x) has the moments of q(z_s|x) = N(alpha_s F(x,s), sigma_s^2)."""
    F = SmoothTransform()
    n = 400_000
    x = torch.tensor([[-0.8, 0.1, 0.6]]).expand(n, 3)
    schedule = CosineGamma(-8.0, 6.0)
    t, s = torch.full((n,), 0.7), torch.full((n,), 0.4)
    gt, gs = schedule(t), schedule(s)
    g = torch.Generator().manual_seed(0)
    z_t = P.marginal_sample(F(x, t), gt, torch.randn(x.shape, generator=g))
    mean = P.posterior_mean(F(x, s), F(x, t), z_t, gs, gt)
    _, v = P.posterior_coefficients(gs, gt)
    z_s = mean + v.sqrt()[:, None] * torch.randn(x.shape, generator=g)
    alpha_s, sigma_s = P.alpha_sigma(gs[0])
    want_mean, want_var = alpha_s * F(x[:1], s[:1])[0], sigma_s**2
    se_mean = math.sqrt(want_var / n)
    assert torch.all((z_s.mean(0) - want_mean).abs() < 5 * se_mean)
    assert torch.all((z_s.var(0) - want_var).abs() < 5 * want_var * math.sqrt(2 / n))


def test_posterior_is_ddpm_posterior_for_identity() -> None:
    gs, gt = torch.tensor([-3.0]), torch.tensor([1.0])
    c, v = P.posterior_coefficients(gs, gt)
    a2 = lambda g: torch.sigmoid(-g)  # noqa: E731
    beta = 1 - a2(gt) / a2(gs)  # sigma_{t|s}^2
    # DDPM (Ho et al. eq. 7): mean = sqrt(abar_s) beta/(1-abar_t) x + sqrt(alpha_t)(1-abar_s)/(1-abar_t) z_t.
    torch.testing.assert_close(c, torch.sqrt(1 - beta) * (1 - a2(gs)) / (1 - a2(gt)))
    torch.testing.assert_close(v, (1 - a2(gs)) / (1 - a2(gt)) * beta)
    x, z = torch.tensor([[0.3]]), torch.tensor([[-0.5]])
    mean = P.posterior_mean(x, x, z, gs, gt)
    want = a2(gs).sqrt() * beta / (1 - a2(gt)) * x + torch.sqrt(1 - beta) * (1 - a2(gs)) / (1 - a2(gt)) * z
    torch.testing.assert_close(mean, want)


def test_step_kl_equals_torch_distributions() -> None:
    F = SmoothTransform()
    g = torch.Generator().manual_seed(2)
    x, xh, z_t = (torch.randn(5, 2, 3, generator=g) for _ in range(3))
    t, s = torch.full((5,), 0.6), torch.full((5,), 0.55)
    sched = LinearGamma(-10.0, 10.0)
    gs, gt = sched(s), sched(t)
    _, v = P.posterior_coefficients(gs, gt)
    q = Normal(P.posterior_mean(F(x, s), F(x, t), z_t, gs, gt), v.sqrt().view(-1, 1, 1))
    p = Normal(P.posterior_mean(F(xh, s), F(xh, t), z_t, gs, gt), v.sqrt().view(-1, 1, 1))
    want = kl_divergence(q, p).flatten(1).sum(1)
    got = P.diffusion_kl(F(x, s) - F(xh, s), F(x, t) - F(xh, t), gs, gt)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


# -- discrete time converges to continuous time -------------------------------------------------


@pytest.mark.parametrize("transform", ["smooth", "separable"])
def test_discrete_loss_converges_to_continuous(transform: str) -> None:
    """Fixed non-linear F and fixed xhat: sum_i KL_i -> integral of the continuous integrand (for the
    time-separable F, with its closed-form dF/dt in the integrand)."""
    F = SmoothTransform() if transform == "smooth" else SeparableTransform(GroupsMLP(4, 3), 3)
    sched = LinearGamma(-10.0, 5.0)
    x = torch.tensor([[-0.9, -0.2, 0.4, 0.8]])
    xh = torch.tensor([[-0.7, 0.1, 0.3, 0.95]])

    def discrete(T: int) -> float:
        t = torch.arange(1, T + 1) / T
        s = torch.arange(0, T) / T
        X, XH = x.expand(T, 4), xh.expand(T, 4)
        return P.diffusion_kl(F(X, s) - F(XH, s), F(X, t) - F(XH, t), sched(s), sched(t)).sum().item()

    # The continuous integral by Gauss-Legendre quadrature on 8 panels (exact to ~1e-12 here).
    nodes_np, weights_np = np.polynomial.legendre.leggauss(64)
    nodes, weights = torch.from_numpy(nodes_np), torch.from_numpy(weights_np)
    total = 0.0
    for k in range(8):
        a, b = k / 8, (k + 1) / 8
        t = (a + b) / 2 + (b - a) / 2 * nodes
        X, XH = x.expand(len(t), 4), xh.expand(len(t), 4)
        f_x, fd_x = F.value_and_time_derivative(X, t)
        f_h, fd_h = F.value_and_time_derivative(XH, t)
        g, dg = sched.gamma_and_derivative(t)
        total += ((b - a) / 2 * weights * P.diffusion_loss_continuous(f_x - f_h, fd_x - fd_h, g, dg)).sum().item()

    errors = [abs(discrete(T) - total) / total for T in (10, 100, 1000, 10_000)]
    assert errors[-1] < 1e-3, errors
    assert errors[0] > errors[1] > errors[2] > errors[3], errors


def test_continuous_loss_sign_matters() -> None:
    """The minus sign in (d - d_dot/gamma'), against a value worked by hand (a plus sign gives 1.25^2 per dim);
    the discrete-limit test above pins the sign on a non-linear F as well."""
    d, d_dot = torch.ones(1, 3), torch.full((1, 3), 0.5)
    g, dg = torch.tensor([0.0]), torch.tensor([2.0])
    minus = P.diffusion_loss_continuous(d, d_dot, g, dg)
    torch.testing.assert_close(minus, torch.tensor([0.5 * 2.0 * 3 * 0.75**2]))


# -- forward-mode dF/dt and gradients -----------------------------------------------------------


def test_unet_transform_time_derivative_matches_central_differences() -> None:
    unet = UNet(1, 1, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=4)
    net = perturbed(unet, 0)
    F = NeuralTransform(net)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.9])
    f_jvp, d_jvp = F.value_and_time_derivative(x, t, "jvp")
    f_fad, d_fad = F.value_and_time_derivative(x, t, "forward_ad")
    f_tan, d_tan = F.value_and_time_derivative(x, t, "tangent")  # the U-Net's hand-written pass (the default)
    torch.testing.assert_close(f_tan, f_jvp)
    torch.testing.assert_close(d_tan, d_jvp, rtol=1e-10, atol=1e-12)
    F.fd_step = 1e-7  # the time embedding's 1000 rad per unit t makes the O(h^2) term large at 1e-5
    f_fd, d_fd = F.value_and_time_derivative(x, t, "fd")
    torch.testing.assert_close(f_jvp, F(x, t))
    torch.testing.assert_close(d_fad, d_jvp, rtol=1e-10, atol=1e-12)
    assert (d_jvp - d_fd).norm() / d_jvp.norm() < 1e-6
    assert d_jvp.abs().max() > 1e-3  # the check is not vacuous


def test_separable_transform_has_its_closed_form_time_derivative() -> None:
    """F(x, t) = x + sum_k t^k NN_k(x): F(x, 0) = x exactly; F and dF/dt from one evaluation equal the sum written
    out from the network's output groups, and torch.func.jvp / forward-mode AD / central differences in t."""
    unet = UNet(1, 3, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=4)
    F = SeparableTransform(perturbed(unet, 0), 3)  # K = 3 groups of one channel each
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.9])
    f, d = F.value_and_time_derivative(x, t)  # the closed form (the default)
    nn_k = unet(x, torch.zeros(3))  # [B, K, 8, 8]: NN_1, NN_2, NN_3 of one channel each
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(f, x + tt * nn_k[:, :1] + tt**2 * nn_k[:, 1:2] + tt**3 * nn_k[:, 2:])
    torch.testing.assert_close(d, nn_k[:, :1] + 2 * tt * nn_k[:, 1:2] + 3 * tt**2 * nn_k[:, 2:])
    torch.testing.assert_close(F(x, t), f)
    for method in ("jvp", "forward_ad"):
        f_ad, d_ad = F.value_and_time_derivative(x, t, method)
        torch.testing.assert_close(f_ad, f)
        torch.testing.assert_close(d_ad, d, rtol=1e-10, atol=1e-12)
    F.fd_step = 1e-6
    assert (F.value_and_time_derivative(x, t, "fd")[1] - d).norm() / d.norm() < 1e-8
    assert torch.equal(F(x, torch.zeros(3)), x) and d.abs().max() > 1e-3
    with pytest.raises(ValueError, match="closed form"):
        SeparableTransform(unet, 3, "tangent")


def test_separable_transform_from_config_starts_at_the_baseline_and_trains() -> None:
    """model.transform=separable builds one network with K output groups, zero at initialisation (F = x, so the
    loss is the baseline's), and the bound's gradient reaches it."""
    from latent_ndm.config import load_config
    from latent_ndm.nets.build import build_ndm

    small = ["model.denoiser.size=tiny", "model.transform_net.size=tiny", "data.image_size=8"]
    cfg = load_config(None, ["model.transform=separable", "model.transform_basis=3", *small])
    torch.manual_seed(0)
    model = build_ndm(cfg.model, 1, 8).double()
    base = build_ndm(load_config(None, ["model.transform=identity", *small]).model, 1, 8).double()
    base.denoiser.load_state_dict(model.denoiser.state_dict())
    assert model.transform.net.out_conv.out_channels == 3
    x = P.bin_centres(dtype=torch.float64)[torch.randint(0, 256, (4, 1, 8, 8))]
    terms = NDMLoss()(model, x, torch.Generator().manual_seed(0), num_steps=0)
    for key, value in NDMLoss()(base, x, torch.Generator().manual_seed(0), num_steps=0).items():
        torch.testing.assert_close(terms[key], value)
    sum(terms.values()).mean().backward()
    assert model.transform.net.out_conv.weight.grad.abs().max() > 0


def test_the_separable_f_runs_its_network_once_on_x_for_the_whole_loss() -> None:
    """Continuous time needs F(x, t), dF/dt(x, t), F(x, 1) and F(xhat, t), dF/dt(xhat, t): two network passes
    (x and xhat), not three. The terms equal those of separate passes bitwise, and the gradients to round-off."""
    unet = UNet(1, 3, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4)
    model = NDM(LinearGamma(-10.0, 5.0), SeparableTransform(perturbed(unet, 0), 3),
                Denoiser(perturbed(UNet(1, 1, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4), 1),
                         "eps"), "discrete8bit", 0).double()
    calls = []
    model.transform.net.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    pixels = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x = P.bin_centres(dtype=torch.float64)[pixels]
    shared = NDMLoss()(model, x, torch.Generator().manual_seed(1), num_steps=0)
    assert calls == [4, 4]  # x, then xhat
    sum(shared.values()).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls.clear()
    noise = Noise.from_generator(torch.Generator().manual_seed(1), 4, x.device)  # the draws NDMLoss made
    eps_0, t, eps = noise.normal(x), noise.uniform(x.device), noise.normal(x)
    separate = {"rec": model.reconstruction_loss(x, eps_0), "diff": model.diffusion_loss(x, t, eps, 0),
                "prior": model.prior_loss(x)}
    assert calls == [4, 4, 4]
    for key, value in separate.items():
        assert torch.equal(shared[key], value), key
    sum(separate.values()).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)  # summed in another order


def test_gradients_reach_theta_phi_and_a_learnable_schedule() -> None:
    torch.manual_seed(0)
    unet = lambda: UNet(1, 1, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4)  # noqa: E731
    # Perturbed so the zero-initialised layers (which block gradients to the layers before) are open.
    model = NDM(LearnedGamma(-10.0, 5.0, hidden=16), NeuralTransform(perturbed(unet(), 1)),
                Denoiser(perturbed(unet(), 2), "eps"), "discrete8bit", 0)
    x = P.bin_centres(dtype=torch.float64)[torch.randint(0, 256, (4, 1, 8, 8))]
    for T in (0, 10):
        model.zero_grad()
        terms = NDMLoss()(model, x, torch.Generator().manual_seed(0), num_steps=T)
        sum(terms.values()).mean().backward()
        for name, part in (("theta", model.denoiser), ("phi", model.transform), ("gamma", model.schedule)):
            for pname, p in part.named_parameters():
                assert p.grad is not None and (p.grad != 0).any(), f"{name}: {pname} (T={T})"


def test_schedules_are_monotone_and_hit_their_endpoints() -> None:
    t = torch.linspace(0, 1, 101)
    for sched in (LinearGamma(-13.3, 5.0), CosineGamma(-13.3, 5.0), LearnedGamma(-13.3, 5.0, 32)):
        g, dg = sched.gamma_and_derivative(t)
        assert g.dtype == torch.float64
        torch.testing.assert_close(g[[0, -1]], torch.tensor([-13.3, 5.0]), rtol=0, atol=1e-9)
        assert (dg > 0).all()
        fd = (sched(t[1:-1] + 1e-6) - sched(t[1:-1] - 1e-6)) / 2e-6
        torch.testing.assert_close(dg[1:-1], fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma_0", [-13.3, -9.0, -5.0, 0.0, 4.0])
def test_discrete_decoder_window_equals_the_256_bin_softmax(gamma_0: float) -> None:
    """The bin window carries all of p(x | z_0): value and gradients (z_0 and gamma_0) equal the full
    log-softmax over the 256 bins, for z_0 spread over and beyond [-alpha_0, alpha_0]."""
    g = torch.Generator().manual_seed(7)
    x = P.bin_centres(dtype=torch.float64)[torch.randint(0, 256, (4, 2, 6, 6), generator=g)]
    gamma = torch.full((4,), gamma_0, requires_grad=True)
    alpha = torch.sigmoid(-gamma).sqrt().view(-1, 1, 1, 1)
    scale = torch.tensor([1.0, 3.0, 30.0, 0.0]).view(-1, 1, 1, 1) * math.exp(gamma_0 / 2)
    z0 = alpha * x + scale * torch.randn(x.shape, generator=g)
    z0[3] += 1.5 * x[3].sign()  # beyond the outermost bins: the window sits at an end of the range
    z0 = z0.detach().requires_grad_()
    ours = P.reconstruction_nll_discrete(x, z0, gamma)
    logits = Normal(torch.sigmoid(-gamma).sqrt().view(-1, 1, 1, 1, 1) * P.bin_centres(dtype=torch.float64),
                    torch.sigmoid(gamma).sqrt().view(-1, 1, 1, 1, 1)).log_prob(z0[..., None])
    k = torch.round((x + 1) * 128 - 0.5).long()
    want = -torch.log_softmax(logits, -1).gather(-1, k[..., None]).flatten(1).sum(1)
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=0)
    for a, b in zip(torch.autograd.grad(ours.sum(), [z0, gamma]), torch.autograd.grad(want.sum(), [z0, gamma])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())  # logits up to 1e4
    assert P.bin_window(-13.3) == 3 and P.bin_window(4.0) == 256


def test_gaussian_decoder_and_bits_per_dim() -> None:
    """Continuous data (latents): -log N(x; z_0/alpha_0, sigma_0^2/alpha_0^2 I), against torch.distributions."""
    g = torch.Generator().manual_seed(4)
    x, z0 = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    gamma_0 = torch.tensor([-5.0, -2.0, 1.0])
    alpha, sigma = torch.sigmoid(-gamma_0).sqrt().view(-1, 1, 1), torch.sigmoid(gamma_0).sqrt().view(-1, 1, 1)
    want = -Normal(z0 / alpha, sigma / alpha).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(P.reconstruction_nll_gaussian(x, z0, gamma_0), want)
    torch.testing.assert_close(P.bits_per_dim(torch.tensor([10 * math.log(2)]), 10), torch.tensor([1.0]))


def test_dropout_is_refused_inside_f() -> None:
    from latent_ndm.config import ConfigError, load_config
    from latent_ndm.nets.build import build_ndm

    with pytest.raises(ConfigError, match="transform_net.dropout must be 0"):
        load_config(None, ["model.transform_net.dropout=0.1"])
    cfg = load_config(None, ["model.transform_net.size=ddpmpp_cifar10", "model.denoiser.size=tiny"])
    model = build_ndm(cfg.model, 3, 32)  # the preset's dropout 0.1 is switched off for F
    assert all(m.p == 0 for m in model.transform.modules() if isinstance(m, nn.Dropout))


def test_transform_runs_in_float32_under_bf16_autocast() -> None:
    """F's rounding does not cancel in F(x) - F(xhat): under autocast it must equal the fp32 result."""
    unet = UNet(1, 1, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4).float()
    F = NeuralTransform(perturbed(unet, 3))
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float32), torch.tensor([0.3, 0.8], dtype=torch.float32)
    want, want_dot = F.value_and_time_derivative(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_dot = F.value_and_time_derivative(x, t)
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(got_dot, want_dot)
