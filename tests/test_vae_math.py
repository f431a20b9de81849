"""The VAE's probability pieces against torch.distributions and closed forms computed independently here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import Independent, Normal, kl_divergence
from torch.special import ndtr

from vae.distributions import DiagonalGaussian
from vae.likelihoods import (
    DiscretizedGaussian,
    DiscretizedLikelihood,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    build_likelihood,
)

KINDS = ["logistic_mixture", "logistic", "gaussian"]
M = 3  # mixture components in these tests
CENTRES64 = (torch.arange(256, dtype=torch.float64) * 2 + 1) / 256 - 1  # the convention, written out again here


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- DiagonalGaussian ------------------------------------------------------------------------------------------


def posterior(seed: int = 0, shape=(4, 3, 5, 6), dtype=torch.float64) -> DiagonalGaussian:
    g = gen(seed)
    mean = torch.randn(shape, generator=g, dtype=dtype)
    logvar = torch.empty(shape, dtype=dtype).uniform_(-3, 3, generator=g)
    return DiagonalGaussian(mean, logvar)


def test_gaussian_kl_entropy_log_prob_match_torch_distributions():
    q = posterior()
    ref = Independent(Normal(q.mean, q.std), 3)
    prior = Independent(Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean)), 3)
    z = torch.randn(q.mean.shape, generator=gen(1), dtype=q.mean.dtype)
    pairs = [(q.kl(), kl_divergence(ref, prior)), (q.entropy(), ref.entropy()), (q.log_prob(z), ref.log_prob(z))]
    for got, want in pairs:
        assert got.shape == (4,)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    assert (q.kl() > 0).all()
    torch.testing.assert_close(q.var, q.std.square())
    assert torch.equal(q.mode(), q.mean)


def test_gaussian_per_example_sums_are_float32_or_wider_and_logvar_is_clamped():
    q = posterior(dtype=torch.bfloat16)
    assert q.kl().dtype == q.entropy().dtype == q.log_prob(q.mean).dtype == torch.float32
    wild = DiagonalGaussian(torch.zeros(2, 3), torch.tensor([[-100.0, 0.0, 100.0]] * 2))
    assert wild.logvar.tolist()[0] == [-30.0, 0.0, 20.0]
    assert torch.isfinite(wild.kl()).all() and torch.isfinite(wild.log_prob(torch.ones(2, 3))).all()
    with pytest.raises(ValueError, match="same shape"):
        DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 4))


def test_gaussian_sample_is_reproducible_reparameterised_and_has_the_right_moments():
    q = posterior()
    assert torch.equal(q.sample(gen(5)), q.sample(gen(5)))
    assert not torch.equal(q.sample(gen(5)), q.sample(gen(6)))

    n = 200_000
    mean = torch.tensor([[-1.0, 0.0, 2.5]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[0.0, -2.0, 1.5]], dtype=torch.float64, requires_grad=True)
    z = DiagonalGaussian(mean.expand(n, 3), logvar.expand(n, 3)).sample(gen(7))
    var = logvar.detach().exp()[0]
    # Sample mean within 5 standard errors; sample variance within 5 standard errors (Var(s^2) = 2 var^2 / n).
    assert ((z.mean(0) - mean.detach()[0]).abs() < 5 * (var / n).sqrt()).all()
    assert ((z.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()
    z.sum().backward()  # dz/dmean = 1 per draw
    torch.testing.assert_close(mean.grad, torch.full_like(mean, float(n)))
    assert logvar.grad.abs().min() > 0


def test_gaussian_affine_matches_transformed_samples_and_change_of_variables():
    q = posterior()
    shift = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    qa = q.affine(shift, scale)
    s4 = lambda v: v.reshape(1, 3, 1, 1)
    # Same eps (same generator seed): the transformed sample of q is the sample of the transformed q.
    torch.testing.assert_close(qa.sample(gen(3)), (q.sample(gen(3)) - s4(shift)) / s4(scale))
    torch.testing.assert_close(qa.mean, (q.mean - s4(shift)) / s4(scale))
    torch.testing.assert_close(qa.std, q.std / s4(scale))
    # log q'(z') = log q(z) + sum over dims of log|scale_c| (5 x 6 positions per channel); negative scales too.
    for sc in (scale, -scale):
        z = q.sample(gen(4))
        got = q.affine(shift, sc).log_prob((z - s4(shift)) / s4(sc))
        torch.testing.assert_close(got, q.log_prob(z) + 30 * sc.abs().log().sum())
    with pytest.raises(ValueError, match="per-channel"):
        q.affine(torch.zeros(4), torch.ones(4))


# -- discrete pixel likelihoods -------------------------------------------------------------------------------


def make_params(lik: DiscretizedLikelihood, means: Tensor, log_scales: Tensor, logits: Tensor | None = None) -> Tensor:
    """Pack per-channel means, log-scales (and logits) [B, C, M, H, W] into the channel-major [B, C*P, H, W]."""
    parts = [means, log_scales]
    if lik.weighted:
        parts = [torch.zeros_like(means) if logits is None else logits, *parts]
    return torch.cat(parts, dim=2).flatten(1, 2)


def random_params(lik: DiscretizedLikelihood, shape=(2, 3, 4, 4), seed: int = 0, dtype=torch.float32) -> Tensor:
    b, c, h, w = shape
    g = gen(seed)
    m = lik.num_mixtures
    means = torch.empty(b, c, m, h, w, dtype=dtype).uniform_(-1.2, 1.2, generator=g)
    log_scales = torch.empty(b, c, m, h, w, dtype=dtype).uniform_(-6, 0, generator=g)
    logits = 2 * torch.randn(b, c, m, h, w, generator=g, dtype=dtype)
    return make_params(lik, means, log_scales, logits)


def reference_probs(kind: str, params: Tensor) -> Tensor:
    """Bin probabilities [B, C, H, W, 256] as plain CDF differences in float64 (sigmoid or ndtr), no log tricks."""
    lik = build_likelihood(kind, M)
    p = params.double().unflatten(1, (-1, lik.params_per_channel)).unsqueeze(-1)  # [B, C, P, H, W, 1]
    m = lik.num_mixtures
    if lik.weighted:
        weights, means, log_scales = p[:, :, :m].softmax(2), p[:, :, m:2 * m], p[:, :, 2 * m:]
    else:
        weights, means, log_scales = 1.0, p[:, :, 0:1], p[:, :, 1:2]
    scale = log_scales.clamp_min(-7).exp()
    cdf = ndtr if kind == "gaussian" else torch.sigmoid
    upper, lower = cdf((CENTRES64 + 1 / 256 - means) / scale), cdf((CENTRES64 - 1 / 256 - means) / scale)
    upper[..., -1], lower[..., 0] = 1.0, 0.0
    return (weights * (upper - lower)).sum(2)


@pytest.mark.parametrize("kind", KINDS)
def test_probabilities_sum_to_one_even_for_extreme_params(kind):
    lik = build_likelihood(kind, M)
    # Every (mean, log-scale) pair on a grid: tiny scales (-7, and -20 which the clamp raises to -7), wide scales,
    # means on a centre, on a bin edge, at the edges of [-1, 1] and far outside.
    means = torch.tensor([-100.0, -3.0, -1.0, -1 + 1 / 256, -0.5, 0.0, 1 / 256, 0.999, 1.0, 1.7, 50.0])
    log_scales = torch.tensor([-20.0, -7.0, -4.0, -1.0, 0.0, 3.0, 8.0])
    mu, ls = torch.meshgrid(means, log_scales, indexing="ij")
    mu, ls = mu.reshape(1, 1, 1, 1, -1).expand(1, 1, M if lik.weighted else 1, 1, -1), ls.reshape(1, 1, 1, 1, -1)
    mu = mu + torch.linspace(0, 0.3, mu.shape[2]).reshape(1, 1, -1, 1, 1)  # distinct components in the mixture
    params = make_params(lik, mu, ls.expand_as(mu), torch.randn(mu.shape, generator=gen(0)))
    for p in (params, random_params(lik)):
        lp = lik.log_probs(p)
        assert lp.shape == (*p.shape[:1], p.shape[1] // lik.params_per_channel, *p.shape[2:], 256)
        assert torch.isfinite(lp).all()
        assert lp.logsumexp(-1).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_probabilities_equal_cdf_differences_computed_independently(kind):
    """Gaussian: Phi differences with torch.special.ndtr; logistic (mixture): sigmoid differences; all in float64."""
    lik = build_likelihood(kind, M)
    for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
        params = random_params(lik, seed=1, dtype=dtype)
        probs = lik.log_probs(params).double().exp()
        torch.testing.assert_close(probs, reference_probs(kind, params), rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_nll_is_minus_log_probs_gathered_at_the_pixel(kind):
    lik = build_likelihood(kind, M)
    params = random_params(lik, seed=2)
    k = torch.randint(0, 256, (2, 3, 4, 4), generator=gen(3))
    k[0, 0, 0, :2] = torch.tensor([0, 255])  # the edge bins go through their own branch
    x = CENTRES64.float()[k]
    want = -lik.log_probs(params).gather(-1, k.unsqueeze(-1)).squeeze(-1).flatten(1).sum(1)
    got = lik.nll(params, x)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        lik.nll(params, x[:, :2])


@pytest.mark.parametrize("kind", KINDS)
def test_channel_c_reads_only_its_own_params_block(kind):
    lik = build_likelihood(kind, M)
    params = random_params(lik, seed=4)
    moved = params.clone()
    p = lik.params_per_channel
    moved[:, p:2 * p] += 0.5  # channel 1 only
    before, after = lik.log_probs(params), lik.log_probs(moved)
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.allclose(before[:, 1], after[:, 1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("log_scale", [-7.0, -12.0])
def test_nll_gradients_are_finite_at_the_edge_bins_with_the_smallest_scale(kind, log_scale):
    lik = build_likelihood(kind, M)
    # Pixels at values 0 and 255 under means from far below to far above [-1, 1]: every branch, both tails.
    mu = torch.tensor([-100.0, -1.0, -1 + 1 / 256, 0.0, 1 - 1 / 256, 1.0, 100.0]).reshape(1, 1, 1, 1, -1)
    mu = mu.expand(2, 1, lik.num_mixtures, 1, -1) + torch.linspace(0, 0.01, lik.num_mixtures).reshape(1, 1, -1, 1, 1)
    params = make_params(lik, mu, torch.full_like(mu, log_scale)).requires_grad_(True)
    x = torch.tensor([-1 + 1 / 256, 1 - 1 / 256]).reshape(2, 1, 1, 1).expand(2, 1, 1, mu.shape[-1])
    nll = lik.nll(params, x)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(params.grad).all()
    assert params.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_scale_on_a_bin_centre_puts_all_mass_in_that_bin(kind):
    lik = build_likelihood(kind, M)
    k = torch.tensor([0, 1, 77, 128, 254, 255])
    x = CENTRES64.float()[k].reshape(1, 1, 1, -1)
    mu = x.unsqueeze(2).expand(1, 1, lik.num_mixtures, 1, -1)
    logits = torch.randn(mu.shape, generator=gen(5))
    nll = lik.nll(make_params(lik, mu, torch.full_like(mu, -7.0), logits), x)
    # Log-scales are clamped below at -7, so a smaller one is the same law.
    assert torch.equal(lik.nll(make_params(lik, mu, torch.full_like(mu, -12.0), logits), x), nll)
    # Closed forms in units of the scale, half-bin h = e^7 / 256: an inner bin has mass F(h) - F(-h), an edge bin F(h).
    h = math.exp(7) / 256
    if kind == "gaussian":
        inner, edge = math.erf(h / math.sqrt(2)), ndtr(torch.tensor(h, dtype=torch.float64)).item()
    else:
        inner, edge = math.tanh(h / 2), 1 / (1 + math.exp(-h))
    want = -(2 * math.log(edge) + 4 * math.log(inner))
    assert nll.item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert nll.item() < 0.15  # i.e. < 0.03 nats per pixel even for the heavy-tailed logistic


@pytest.mark.parametrize("kind", KINDS)
def test_sample_frequencies_match_the_probabilities(kind):
    lik = build_likelihood(kind, M)
    n = 20_000
    # Three channels: a central spread-out law, one pressed against value 255, one far below (all mass in bin 0).
    offsets = torch.tensor([0.0, 0.05, -0.1])[: lik.num_mixtures].reshape(1, 1, -1, 1, 1)  # distinct components
    mu = torch.tensor([0.1, 0.97, -5.0]).reshape(1, 3, 1, 1, 1) + offsets
    ls = torch.tensor([-3.0, -4.0, -2.0]).reshape(1, 3, 1, 1, 1).expand_as(mu)
    logits = torch.tensor([0.0, 1.0, -1.0])[: lik.num_mixtures].reshape(1, 1, -1, 1, 1).expand_as(mu)
    params = make_params(lik, mu, ls, logits)
    x = lik.sample(params.expand(n, -1, -1, -1), generator=gen(6))  # [n, 3, 1, 1]
    assert torch.equal(x, lik.sample(params.expand(n, -1, -1, -1), generator=gen(6)))
    k = ((x + 1) * 128 - 0.5).round().long()
    assert torch.equal(CENTRES64.float()[k], x)  # on the bin centres
    probs = lik.log_probs(params).double().exp()[0, :, 0, 0]  # [3, 256]
    for c in range(3):
        counts = torch.bincount(k[:, c, 0, 0], minlength=256).double()
        expected = n * probs[c]
        assert counts[expected < 1e-3].sum() == 0  # nothing lands where there is (almost) no mass
        big = expected >= 5  # chi-square over the well-populated bins, the rest pooled into one cell
        obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
        exp_ = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
        keep = exp_ > 0
        chi2 = ((obs - exp_)[keep].square() / exp_[keep]).sum().item()
        df = int(keep.sum()) - 1
        assert chi2 < df + 6 * math.sqrt(2 * max(df, 1)) + 10, (c, chi2, df)
    assert (k[:, 2] == 0).all() and (k[:, 1] == 255).any()


@pytest.mark.parametrize("kind", KINDS)
def test_mean_is_the_expected_bin_centre(kind):
    lik = build_likelihood(kind, M)
    params = random_params(lik, seed=7, dtype=torch.float64)
    mean = lik.mean(params)
    assert mean.shape == (2, 3, 4, 4) and mean.abs().max() <= 1
    torch.testing.assert_close(mean, reference_probs(kind, params) @ CENTRES64, rtol=0, atol=1e-9)
    # The bins are symmetric about 0, so a symmetric law centred at 0 has mean exactly 0, whatever its scale.
    mu = torch.zeros(1, 1, lik.num_mixtures, 1, 3)
    ls = torch.tensor([-7.0, -1.0, 4.0]).reshape(1, 1, 1, 1, 3).expand_as(mu)
    assert lik.mean(make_params(lik, mu, ls)).abs().max() < 1e-6


def test_build_likelihood_kinds_and_parameter_counts():
    assert isinstance(build_likelihood("logistic_mixture", 5), DiscretizedLogisticMixture)
    assert build_likelihood("logistic_mixture", 5).params_per_channel == 15
    assert type(build_likelihood("logistic")) is DiscretizedLogistic
    assert build_likelihood("logistic").params_per_channel == 2
    assert isinstance(build_likelihood("gaussian"), DiscretizedGaussian)
    assert build_likelihood("gaussian").params_per_channel == 2
    with pytest.raises(ValueError, match="'logistic_mixture', 'logistic', 'gaussian'"):
        build_likelihood("bernoulli")


def test_bf16_params_are_evaluated_in_float32():
    lik = build_likelihood("logistic_mixture", M)
    params = random_params(lik, seed=8)
    x = lik.sample(params, generator=gen(9))
    got = lik.nll(params.bfloat16(), x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, lik.nll(params.bfloat16().float(), x))
