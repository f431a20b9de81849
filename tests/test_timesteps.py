"""Time sampling: stratified uniforms, and an importance proposal that is unbiased and reduces variance."""

from __future__ import annotations

import math

import torch

from latent_ndm.core.noise import Noise, keyed_generator
from latent_ndm.core.timesteps import ImportanceSampler


def test_low_discrepancy_points_are_stratified() -> None:
    u = Noise.from_generator(torch.Generator().manual_seed(0), 8).uniform(torch.device("cpu"))
    assert ((u >= 0) & (u < 1)).all()
    assert torch.equal(torch.sort((u * 8).floor()).values, torch.arange(8.0, dtype=torch.float64))


def test_keyed_noise_does_not_depend_on_how_the_batch_is_split() -> None:
    """Two lanes of 3 rows held by one process equal the same lanes held by two processes."""
    def lanes(held: list[int]) -> Noise:
        gens = [keyed_generator("cpu", 0, "train", 5, lane) for lane in held]
        pos = torch.cat([torch.arange(3) + 3 * lane for lane in held])
        return Noise(gens, [3] * len(held), keyed_generator("cpu", 0, "t", 5), pos, 6)

    like = torch.zeros(6, 2)
    whole = lanes([0, 1])
    eps_whole, u_whole = whole.normal(like), whole.uniform(torch.device("cpu"))
    parts = [lanes([k]) for k in (0, 1)]
    assert torch.equal(torch.cat([p.normal(like[:3]) for p in parts]), eps_whole)
    assert torch.equal(torch.cat([p.uniform(torch.device("cpu")) for p in parts]), u_whole)
    assert torch.equal(torch.sort((u_whole * 6).floor()).values, torch.arange(6.0, dtype=torch.float64))
    one = Noise.per_example([7, 9], "cpu", "eval")
    assert torch.equal(one.normal(like[:2])[1], Noise.per_example([9], "cpu", "eval").normal(like[:1])[0])


def test_importance_sampling_is_unbiased_and_lowers_variance() -> None:
    """For l(t) = exp(8t) (a loss density spread over orders of magnitude, as in diffusion),
    E[l(t)/p(t)] equals the integral and the learned proposal has far lower variance than uniform."""
    loss = lambda t: torch.exp(8 * t)  # noqa: E731
    exact = (math.exp(8) - 1) / 8
    sampler = ImportanceSampler(bins=50, decay=0.9, uniform_mix=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # learn the proposal from observed losses
        t, _ = sampler.sample(torch.rand(256, generator=g, dtype=torch.float64))
        sampler.update(t, loss(t))
    u = torch.rand(400_000, generator=g, dtype=torch.float64)
    t, w = sampler.sample(u)
    est = loss(t) * w
    uniform = loss(u)
    se = est.std() / math.sqrt(len(u))
    assert abs(est.mean() - exact) < 4 * se
    assert est.var() < 0.1 * uniform.var()
    # The proposal's density integrates to one and matches 1/w at the sampled points.
    p = sampler.probabilities()
    assert abs(p.sum().item() - 1) < 1e-12
    k = (t * 50).long().clamp(max=49)
    torch.testing.assert_close(1 / w, p[k] * 50)


def test_importance_sampler_state_round_trips() -> None:
    a = ImportanceSampler(bins=10)
    a.update(torch.tensor([0.05, 0.55], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64))
    b = ImportanceSampler(bins=10)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.probabilities(), b.probabilities())
