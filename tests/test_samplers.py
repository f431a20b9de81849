"""Samplers and the ODE likelihood: a shared contract, ODE solvers, and a Gaussian oracle with known answers."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import perturbed
from torch import Tensor, nn

from latent_ndm.core import process as P
from latent_ndm.core.ndm import NDM, Denoiser
from latent_ndm.core.schedules import LinearGamma
from latent_ndm.core.transforms import IdentityTransform, NeuralTransform
from latent_ndm.nets.unet import UNet
from latent_ndm.sampling import ode
from latent_ndm.sampling.guidance import autoguided
from latent_ndm.sampling.ode_nll import _probes, drift_and_divergence, ode_nll
from latent_ndm.sampling.samplers import SAMPLERS, ancestral, deterministic


def tiny_ndm(num_steps: int = 0, size: int = 8, scale: float = 0.05) -> NDM:
    torch.manual_seed(0)
    unet = lambda: UNet(1, 1, size, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4)  # noqa: E731
    return NDM(LinearGamma(-13.3, 5.0), NeuralTransform(perturbed(unet(), 1, scale)),
               Denoiser(perturbed(unet(), 2, scale)), "discrete8bit", num_steps, data_shape=(1, size, size)).eval()


# -- one contract for every sampler -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_contract(name: str) -> None:
    ndm, fn = tiny_ndm(), SAMPLERS[name]
    if name == "ode_rk45":  # the randomly perturbed network's flow is stiff: keep the contract test quick
        fn = functools.partial(fn, rtol=1e-2, atol=1e-2)
    seen = []
    a = fn(ndm, (3, 1, 8, 8), torch.Generator().manual_seed(5), 4, lambda k, n, z, xh: seen.append(k))
    b = fn(ndm, (3, 1, 8, 8), torch.Generator().manual_seed(5), 4)
    c = fn(ndm, (3, 1, 8, 8), torch.Generator().manual_seed(6), 4)
    assert a.x.shape == (3, 1, 8, 8) and a.x.dtype == torch.float32
    assert torch.isfinite(a.x).all() and torch.equal(a.x, b.x) and not torch.equal(a.z_0, c.z_0)
    # Outputs lie on the 8-bit bin centres, the support of p(x | z_0).
    torch.testing.assert_close(P.bin_centres()[P.to_bin_index(a.x)], a.x)
    assert a.nfe_xhat > 0 and a.nfe_f == a.nfe_xhat and seen and seen[0] == 1
    if name in ("ancestral", "deterministic", "sde"):
        assert a.nfe_xhat == 4 and seen == [1, 2, 3, 4]
    if name == "ode_heun":
        assert a.nfe_xhat == 8
    if name == "ode_euler":
        assert a.nfe_xhat == 4 and seen == [1, 2, 3, 4]


def test_identity_transform_counts_no_f_evaluations() -> None:
    ndm = tiny_ndm()
    ndm.transform = IdentityTransform()
    assert ancestral(ndm, (2, 1, 8, 8), torch.Generator().manual_seed(0), 3).nfe_f == 0


def test_discrete_model_follows_its_ancestral_chain_exactly() -> None:
    T = 5
    ndm = tiny_ndm(T)
    out = ancestral(ndm, (2, 1, 8, 8), torch.Generator().manual_seed(9))
    # The chain written out from the posterior of docs/MATH.md section 3, with the same random draws.
    g = torch.Generator().manual_seed(9)
    z = torch.randn(2, 1, 8, 8, generator=g)
    for i in range(T, 0, -1):
        t, s = torch.full((2,), i / T, dtype=torch.float64), torch.full((2,), (i - 1) / T, dtype=torch.float64)
        a2_t, a2_s = torch.sigmoid(-ndm.gamma(t)), torch.sigmoid(-ndm.gamma(s))
        s2_t, s2_s = 1 - a2_t, 1 - a2_s
        v = (s2_t - a2_t / a2_s * s2_s) * s2_s / s2_t
        c = torch.sqrt(s2_s - v) / s2_t.sqrt()
        xh = ndm.xhat(z, t)
        f_s, f_t = ndm.transform(xh, s), ndm.transform(xh, t)
        view = lambda q: q.float().view(-1, 1, 1, 1)  # noqa: E731
        z = view(a2_s.sqrt()) * f_s + view(c) * (z - view(a2_t.sqrt()) * f_t) + view(v.sqrt()) * torch.randn(
            z.shape, generator=g)
    torch.testing.assert_close(out.z_0, z, rtol=1e-5, atol=1e-6)
    assert out.nfe_xhat == T


def test_strided_grid_of_a_discrete_model() -> None:
    from latent_ndm.sampling.samplers import time_grid

    ndm = tiny_ndm(1000)
    grid = time_grid(ndm, 10, torch.device("cpu"))
    torch.testing.assert_close(grid, torch.arange(10, -1, -1, dtype=torch.float64) / 10)
    with pytest.raises(ValueError, match="at most 1000 steps"):
        time_grid(ndm, 2000, torch.device("cpu"))


# -- ODE solvers --------------------------------------------------------------------------------


def test_heun_and_rk45_agree_with_the_exact_solution() -> None:
    f = lambda t, z: -t * z  # noqa: E731  z(t) = z(0) exp(-t^2 / 2)
    z0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    exact = z0 * math.exp(-2.0)
    rk = ode.rk45(f, z0, 0.0, 2.0, rtol=1e-8, atol=1e-10)
    hn = ode.heun(f, z0, torch.linspace(0, 2, 201, dtype=torch.float64))
    assert (rk.z - exact).abs().max() < 1e-7 * 2  # meets its tolerance (global error ~ a few rtol)
    assert (hn.z - exact).abs().max() < 1e-4  # second order at h = 0.01
    assert (hn.z - rk.z).abs().max() < 1e-4
    assert hn.nfe == 400 and rk.nfe == 1 + 6 * (rk.steps + rk.rejected)
    back = ode.rk45(f, rk.z, 2.0, 0.0, rtol=1e-8, atol=1e-10)  # integrating back recovers the start
    assert (back.z - z0).abs().max() < 1e-6
    loose = ode.rk45(f, z0, 0.0, 2.0, rtol=1e-3, atol=1e-3)
    assert loose.steps < rk.steps and (loose.z - exact).abs().max() < 1e-2


# -- Gaussian data with the optimal denoiser ----------------------------------------------------

MEAN = torch.tensor([0.5, -0.3, 0.0, 0.2])
STD = torch.tensor([0.3, 0.5, 0.2, 0.4])


class GaussianOracle(nn.Module):
    """E[x | z_t] for x ~ N(m, s^2) per dimension: m + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha m)."""

    def __init__(self, schedule: LinearGamma, std: Tensor = STD):
        super().__init__()
        self.schedule, self.std = schedule, std

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        g = self.schedule(t).view(-1, 1)
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        m, v = MEAN.double(), self.std.double() ** 2
        return (m + a2.sqrt() * v / (a2 * v + s2) * (z.double() - a2.sqrt() * m)).to(z.dtype)


GAMMA_MIN, GAMMA_MAX = -13.3, 8.0  # alpha_1 = 0.018: the N(0, I) prior nearly matches q(z_1)


def gaussian_ndm(std: Tensor = STD, gamma_max: float = GAMMA_MAX) -> NDM:
    sched = LinearGamma(GAMMA_MIN, gamma_max)
    return NDM(sched, IdentityTransform(), Denoiser(GaussianOracle(sched, std), "x"), "gaussian", 0, data_shape=(4,))


@pytest.mark.parametrize("probe_kind", ["rademacher", "gaussian"])
def test_ode_nll_equals_the_analytic_gaussian_density(probe_kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = MEAN + STD * torch.randn(32, 4, generator=g)
    nll, info = ode_nll(gaussian_ndm(), x, g, probes=4, probe_kind=probe_kind, rtol=1e-6, atol=1e-6)
    # With the optimal xhat the flow is affine per dimension: it maps q(z_0) = N(alpha_0 m, r_0^2) onto
    # q(z_1) = N(alpha_1 m, r_1^2), r_t^2 = alpha_t^2 s^2 + sigma_t^2. The model density of x starts from
    # the N(0, I) prior at t = 1: log p(x) = log N(z_1; 0, 1) + log(r_1 / r_0) + log alpha_0, z_0 = alpha_0 x.
    m, s, xd = MEAN.double(), STD.double(), x.double()
    a2 = lambda g: torch.sigmoid(-torch.tensor(g, dtype=torch.float64))  # noqa: E731
    r0, r1 = (torch.sqrt(a2(g) * s**2 + 1 - a2(g)) for g in (GAMMA_MIN, GAMMA_MAX))
    a0, a1 = a2(GAMMA_MIN).sqrt(), a2(GAMMA_MAX).sqrt()
    z1 = a1 * m + r1 / r0 * (a0 * xd - a0 * m)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z1) + torch.log(r1 / r0) + torch.log(a0)
    exact = -log_p.sum(1)
    data_nll = -torch.distributions.Normal(m, s).log_prob(xd).sum(1)
    assert (exact - data_nll).abs().max() < 0.05  # and the model is close to the data density
    err = (nll - exact).abs()
    if probe_kind == "rademacher":
        # The oracle's Jacobian is diagonal, where Rademacher probes are exact: only solver error remains.
        assert err.max() < 2e-3, err.max()
    else:
        # Gaussian probes: per-example error ~ sqrt(2/K) * |div|-scale; the batch mean is unbiased.
        assert abs((nll - exact).mean()) < 4 * (nll - exact).std() / math.sqrt(len(x)) + 1e-3
    assert info["nfe"] > 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_matches_gaussian_moments(name: str) -> None:
    steps = 20 if name == "ode_rk45" else 200
    res = SAMPLERS[name](gaussian_ndm(), (4000, 4), torch.Generator().manual_seed(1), steps)
    mean, std = res.x.mean(0), res.x.std(0)
    se = STD / math.sqrt(4000)
    assert ((mean - MEAN).abs() < 4 * se + 0.01).all(), (mean, MEAN)
    assert ((std / STD - 1).abs() < 0.06).all(), (std, STD)


@pytest.mark.parametrize("name", ["deterministic", "ode_euler", "ode_heun", "ode_rk45"])
def test_temperature_contracts_a_deterministic_samplers_output_by_its_factor(name: str) -> None:
    """With the optimal denoiser the probability-flow map is affine per dimension, x = m + (s / r_1)(z_1 -
    alpha_1 m) with r_1 ~ 1: starting from z_1 ~ N(0, tau^2 I) gives N(m, (tau s)^2), the mean unmoved."""
    steps, tau = (20 if name == "ode_rk45" else 200), 0.5
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    cold = SAMPLERS[name](gaussian_ndm(), (4000, 4), g(), steps, temperature=tau)
    warm = SAMPLERS[name](gaussian_ndm(), (4000, 4), g(), steps)
    se = tau * STD / math.sqrt(4000)
    assert ((cold.x.mean(0) - MEAN).abs() < 4 * se + 0.01).all(), (cold.x.mean(0), MEAN)
    assert ((cold.x.std(0) / (tau * STD) - 1).abs() < 0.06).all(), (cold.x.std(0), tau * STD)
    # The same noise, scaled: each sample moves towards the mean by the factor tau (up to the tiny alpha_1 m).
    torch.testing.assert_close(cold.x - MEAN, tau * (warm.x - MEAN), atol=0.02, rtol=0.02)
    assert torch.equal(SAMPLERS[name](gaussian_ndm(), (8, 4), g(), 4, temperature=1.0).x,
                       SAMPLERS[name](gaussian_ndm(), (8, 4), g(), 4).x)
    with pytest.raises(ValueError, match="temperature"):
        SAMPLERS[name](gaussian_ndm(), (8, 4), g(), 4, temperature=0.0)


def test_autoguided_gaussian_oracles_follow_the_closed_form_of_the_deterministic_sampler() -> None:
    """With linear oracles xhat_v = m + k_v (z_t - alpha_t m), k_v = alpha_t v / (alpha_t^2 v + sigma_t^2), the
    guided prediction has k = w k_main + (1 - w) k_guide, and each deterministic step scales z - alpha m by
    c = alpha_s k + sigma_s / sigma_t (1 - alpha_t k): x = m + (prod c / alpha_0)(z_1 - alpha_1 m), computed here
    in float64 from the schedule alone. Steering N(m, s^2) away from the wider N(m, (2s)^2) narrows it."""
    main, guide, steps = gaussian_ndm(), gaussian_ndm(2 * STD), 40
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    a = lambda t: torch.sigmoid(-main.gamma(t)).sqrt()  # noqa: E731
    sig = lambda t: torch.sigmoid(main.gamma(t)).sqrt()  # noqa: E731
    k = lambda t, std: a(t) * std.double() ** 2 / (a(t) ** 2 * std.double() ** 2 + sig(t) ** 2)  # noqa: E731
    z1 = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    widths = {}
    for w in (1.0, 2.0, 3.5):
        c = torch.ones(4, dtype=torch.float64)
        for t, s in zip(ts[:-1], ts[1:]):
            kg = w * k(t, STD) + (1 - w) * k(t, 2 * STD)
            c = c * (a(s) * kg + sig(s) / sig(t) * (1 - a(t) * kg))
        expect = MEAN.double() + c / a(ts[-1]) * (z1.double() - a(ts[0]) * MEAN.double())
        got = deterministic(autoguided(main, guide, w), (64, 4), torch.Generator().manual_seed(3), steps).x
        torch.testing.assert_close(got.double(), expect, atol=2e-5, rtol=1e-4)
        widths[w] = c / a(ts[-1])
    assert (widths[3.5] < widths[2.0]).all() and (widths[2.0] < widths[1.0]).all()


@pytest.mark.parametrize("name", ["ancestral", "deterministic", "ode_heun"])
def test_autoguidance_weights_one_and_zero_are_the_main_model_and_the_guide(name: str) -> None:
    main, guide, fn = gaussian_ndm(), gaussian_ndm(2 * STD), SAMPLERS[name]
    draw = lambda ndm: fn(ndm, (8, 4), torch.Generator().manual_seed(2), 6).x  # noqa: E731
    assert torch.equal(draw(autoguided(main, guide, 1.0)), draw(main))
    assert torch.equal(draw(autoguided(main, guide, 0.0)), draw(guide))  # F = identity: the guide alone
    assert torch.equal(draw(autoguided(main, main, 3.0)), draw(main))  # a model guided by itself is unchanged
    assert fn(autoguided(main, guide, 2.0), (8, 4), None, 6).nfe_xhat == fn(main, (8, 4), None, 6).nfe_xhat


def test_autoguidance_refuses_a_guide_of_another_space_or_schedule_and_bad_weights() -> None:
    main = gaussian_ndm()
    with pytest.raises(ValueError, match="noise schedule differs"):
        autoguided(main, gaussian_ndm(gamma_max=5.0), 2.0)
    other = gaussian_ndm()
    other.data_shape = (3,)
    with pytest.raises(ValueError, match="same space"):
        autoguided(main, other, 2.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance weight"):
            autoguided(main, gaussian_ndm(), bad)


def test_divergence_with_a_neural_transform_matches_the_exact_jacobian_trace() -> None:
    """With F learned the drift holds a JVP in t; its divergence (reverse mode over that) must equal the
    trace of the full Jacobian, exactly with basis probes and on average with Rademacher probes."""
    ndm = tiny_ndm(size=4, scale=0.05)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 1, 4, 4, generator=g), torch.tensor([0.3, 0.7], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda zz: ndm.ode_drift(zz, t)[0], z)  # [2,1,4,4, 2,1,4,4]
    jac = jac.reshape(2, 16, 2, 16)
    trace = torch.stack([jac[b, :, b, :].diagonal().sum() for b in range(2)]).double()
    _, exact = drift_and_divergence(ndm, z, t, _probes(z.shape, 1, "exact", None, "cpu"))
    torch.testing.assert_close(exact, trace, rtol=1e-5, atol=1e-5)
    k = 200
    _, est = drift_and_divergence(ndm, z, t, _probes(z.shape, k, "rademacher", g, "cpu"))
    # Var(e^T J e) for Rademacher e is 1/2 sum_{i != j} (J_ij + J_ji)^2.
    for b in range(2):
        sym = jac[b, :, b, :] + jac[b, :, b, :].T
        var = 0.5 * (sym.square().sum() - sym.diagonal().square().sum())
        assert abs(est[b] - trace[b]) < 4 * (var / k).sqrt() + 1e-6, (est, trace, var)
    assert trace.abs().min() > 0.1  # not a vacuous comparison


def test_ode_nll_runs_end_to_end_with_a_neural_transform() -> None:
    ndm = tiny_ndm(size=4, scale=0.02)
    x = P.bin_centres()[torch.randint(0, 256, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))]
    nll, info = ode_nll(ndm, x, torch.Generator().manual_seed(1), probes=1, rtol=1e-2, atol=1e-2)
    assert torch.isfinite(nll).all() and info["nfe"] > 0


def test_transform_picture_is_x_at_t0_and_repeats_x_for_the_identity() -> None:
    from latent_ndm.core.codec import PixelCodec
    from latent_ndm.core.model import ImageModel
    from latent_ndm.evaluation.pictures import TIMES, transform_rows

    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = ImageModel(PixelCodec(), tiny_ndm())
    rows, diff, scale = transform_rows(model, images)
    rows = rows.view(3, len(TIMES), 1, 8, 8)
    assert torch.equal(rows[:, 0], images) and scale > 0  # F(x, 0) = x; the perturbed F moves later columns
    assert torch.equal(diff.view(3, len(TIMES), 1, 8, 8)[:, 0], torch.full_like(images, 128))  # mid-grey: 0
    model.ndm.transform = IdentityTransform()
    rows, _, scale = transform_rows(model, images)
    assert torch.equal(rows.view(3, len(TIMES), 1, 8, 8), images[:, None].expand(3, len(TIMES), 1, 8, 8))
    assert scale < 1e-11  # no difference at all (the floor of the scale)


def test_euler_is_first_order_on_the_exact_gaussian_flow() -> None:
    """With the optimal xhat the flow is affine per dimension (see the NLL test): z_0 = alpha_0 m +
    r_0/r_1 (z_1 - alpha_1 m). Euler's error must halve as the steps double; Heun's fall by ~4."""
    from latent_ndm.sampling.samplers import ode_euler, ode_heun

    ndm = gaussian_ndm()
    z_1 = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    m, s = MEAN.double(), STD.double()
    a2 = lambda g: torch.sigmoid(-torch.tensor(g, dtype=torch.float64))  # noqa: E731
    r0, r1 = (torch.sqrt(a2(g) * s**2 + 1 - a2(g)) for g in (GAMMA_MIN, GAMMA_MAX))
    exact = a2(GAMMA_MIN).sqrt() * m + r0 / r1 * (z_1.double() - a2(GAMMA_MAX).sqrt() * m)

    def error(fn, steps: int) -> float:
        return float((fn(ndm, (64, 4), torch.Generator().manual_seed(3), steps).z_0.double() - exact).abs().max())

    e = [error(ode_euler, k) for k in (100, 200, 400)]
    assert 1.7 < e[0] / e[1] < 2.3 and 1.7 < e[1] / e[2] < 2.3, e
    h = [error(ode_heun, k) for k in (100, 200)]
    assert h[1] < e[2] and h[0] / h[1] > 3.0, h
    # One Euler step is Heun's predictor: z_1 - 1 * drift(z_1, t = 1).
    one = ode_euler(ndm, (64, 4), torch.Generator().manual_seed(3), 1)
    drift = ndm.ode_drift(z_1, torch.ones(64, dtype=torch.float64))[0]
    torch.testing.assert_close(one.z_0, z_1 - drift)
    assert one.nfe_xhat == 1
