"""2D experiments: datasets, sample distances and path measures against closed forms, the curvature
penalty's JVP against finite differences along the path, samplers on [B, 2] data, short training runs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import perturbed

from latent_ndm.core.noise import Noise
from latent_ndm.evaluation.distances import energy_distance, random_directions, sliced_wasserstein, wasserstein_1d
from latent_ndm.experiments.toy2d import DATASETS, TimeMLP, build_toy_ndm, sample_data, train_toy, two_moons
from latent_ndm.sampling import ode
from latent_ndm.sampling.paths import (
    curvature_penalty,
    drift_total_derivative,
    ode_paths,
    straightness,
    velocity_deviation,
)
from latent_ndm.sampling.samplers import SAMPLERS

# -- data -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_datasets_have_zero_mean_unit_variance_and_are_reproducible(name: str) -> None:
    x = sample_data(name, 40_000, torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 2) and x.dtype == torch.float32
    assert x.mean(0).abs().max() < 0.02, x.mean(0)  # standard error 0.005
    assert (x.var(0) - 1).abs().max() < 0.03, x.var(0)
    assert torch.equal(x[:10], sample_data(name, 40_000, torch.Generator().manual_seed(0))[:10])
    assert not torch.equal(x[:10], sample_data(name, 40_000, torch.Generator().manual_seed(1))[:10])


def test_dataset_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    board = sample_data("checkerboard", 5000, g) * (2 / math.sqrt(3))  # back to [-2, 2]^2
    cells = torch.floor(board).long()
    assert ((cells.sum(1) % 2) == 0).all() and board.abs().max() <= 2
    assert len({tuple(c) for c in cells.tolist()}) == 8
    pts = sample_data("8gaussians", 5000, g)
    angle = torch.atan2(pts[:, 1], pts[:, 0])
    nearest = torch.round(angle / (math.pi / 4)) * (math.pi / 4)
    centres = math.sqrt(2 * 0.99) * torch.stack([nearest.cos(), nearest.sin()], 1)
    assert (pts - centres).norm(dim=1).max() < 0.6 and abs((pts - centres).std() - 0.1) < 0.01
    # Noise-free moons lie on the two unit half circles, centres (0, 0) and (1, 0.5) before standardising.
    m = two_moons(2000, g, noise=0.0) * torch.tensor([0.75, 9 / 16 - 1 / math.pi]).sqrt() + torch.tensor([0.5, 0.25])
    r_up, r_low = m.norm(dim=1), (m - torch.tensor([1.0, 0.5])).norm(dim=1)
    assert torch.minimum((r_up - 1).abs(), (r_low - 1).abs()).max() < 1e-5


# -- distances: closed forms --------------------------------------------------------------------------------


def test_sliced_wasserstein_of_a_translate_is_the_projected_shift() -> None:
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = torch.tensor([0.7, -0.4], dtype=torch.float64)
    sw = sliced_wasserstein(x, x + d, 64, torch.Generator().manual_seed(5))
    # Along each direction theta the projected sets differ by the shift theta.d, so W_2^2 = (theta.d)^2.
    theta = random_directions(64, 2, torch.Generator().manual_seed(5))
    assert sw == pytest.approx(float((theta @ d).square().mean().sqrt()), rel=1e-12)
    # Over the whole circle E (theta.d)^2 = |d|^2 / 2.
    many = sliced_wasserstein(x, x + d, 5000, torch.Generator().manual_seed(1))
    assert many == pytest.approx(float(d.norm()) / math.sqrt(2), rel=0.02)
    assert sliced_wasserstein(x, x, 16) == 0.0


def test_wasserstein_1d_is_exact_for_unequal_sizes() -> None:
    # {0, 1} against {0, 0, 1}: the quantile functions differ (by 1) only on u in (1/2, 2/3).
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert float(wasserstein_1d(a, b, p=1)) == pytest.approx(1 / 6, rel=1e-12)
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(wasserstein_1d(x, x.repeat(1, 3)), torch.zeros(3, dtype=torch.float64))
    # Equal sizes: the mean squared difference of the sorted values.
    y = torch.randn(3, 37, generator=torch.Generator().manual_seed(1))
    expected = (x.double().sort(-1).values - y.double().sort(-1).values).square().mean(-1)
    torch.testing.assert_close(wasserstein_1d(x, y), expected)


def test_energy_distance_closed_forms() -> None:
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert energy_distance(x, x) == 0.0
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert energy_distance(a, b) == pytest.approx(10.0)  # 2 |a - b|
    # In 1-D the energy distance is 2 int (F_x - F_y)^2 (Szekely), exact for empirical distributions.
    u = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.randn(25, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    grid = torch.cat([u, v]).sort().values
    cdf = lambda s: (s[None, :] <= grid[:-1, None]).double().mean(1)  # noqa: E731  on each interval
    integral = 2 * ((cdf(u) - cdf(v)).square() * torch.diff(grid)).sum()
    assert energy_distance(u[:, None], v[:, None]) == pytest.approx(float(integral), rel=1e-10)


# -- path measures: closed forms -----------------------------------------------------------------------------


def test_straightness_and_velocity_deviation_of_known_paths() -> None:
    K = 20
    ts = torch.linspace(1, 0, K + 1, dtype=torch.float64)
    a, b = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64), torch.tensor([[0.5, -1.5]] * 2)
    uniform = a + ts[:, None, None] * b  # straight, constant speed
    accelerating = a + ts[:, None, None] ** 2 * b  # straight, speed 2t
    torch.testing.assert_close(straightness(uniform), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(straightness(accelerating), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(velocity_deviation(uniform, ts), torch.zeros(2, dtype=torch.float64))
    # int_0^1 |2t - 1|^2 dt |b|^2 = |b|^2 / 3, by the midpoint rule on K segments (1 - h^2) |b|^2 / 3.
    h = 1 / K
    expected = (1 - h**2) / 3 * b.double().square().sum(1)
    torch.testing.assert_close(velocity_deviation(accelerating, ts), expected)
    # A quarter circle drawn as a K-gon: chord sqrt(2) r over the polygon's length 2 K r sin(pi / 4K).
    arc = 3.0 * torch.stack([torch.cos(ts * math.pi / 2), torch.sin(ts * math.pi / 2)], -1)[:, None]
    assert float(straightness(arc)) == pytest.approx(math.sqrt(2) / (2 * K * math.sin(math.pi / (4 * K))))


# -- the model on [B, 2] data --------------------------------------------------------------------------------


def tiny_toy(hidden: int = 16, dtype=torch.float64, scale: float = 0.3):
    ndm = build_toy_ndm("neural", hidden=hidden, depth=2)
    perturbed(ndm.transform, 1, scale)
    perturbed(ndm.denoiser, 2, scale)
    return ndm.to(dtype).eval()


def test_mlp_starts_at_zero_so_f_starts_as_the_identity() -> None:
    net = TimeMLP(2, 16, 3)
    x, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(net(x, t), torch.zeros(5, 2)) and net(x, torch.tensor(0.3)).shape == (5, 2)
    ndm = build_toy_ndm("neural", hidden=16)
    torch.testing.assert_close(ndm.transform(x, t), x)
    # The same seed gives the baseline and the NDM the same initial denoiser.
    base = build_toy_ndm("identity", hidden=16)
    assert all(torch.equal(p, q) for p, q in zip(ndm.denoiser.parameters(), base.denoiser.parameters()))


def test_drift_total_derivative_matches_finite_differences_along_the_path(one_thread) -> None:
    ndm = tiny_toy()
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.15, 0.3, 0.45, 0.55, 0.7, 0.9], dtype=torch.float64)
    with torch.no_grad():
        v, dv = drift_total_derivative(ndm, z, t)
    torch.testing.assert_close(v, ndm.ode_drift(z, t)[0])

    # Independent: follow each path from (z, t) to t +- h with a tight RK45 and difference v there.
    @torch.no_grad()
    def flow(z0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        f = lambda tt, zz: ndm.ode_drift(zz, torch.tensor([tt], dtype=torch.float64))[0]  # noqa: E731
        return ode.rk45(f, z0, t0, t1, rtol=1e-12, atol=1e-12).z

    # The time embedding's top frequency is 1000 (the U-Net's): h must be small against 1/1000.
    h, fd = 1e-6, []
    for i in range(len(t)):
        ti = float(t[i])
        ends = [(flow(z[i:i + 1], ti, ti + s), ti + s) for s in (h, -h)]
        vs = [ndm.ode_drift(zz, torch.tensor([tt], dtype=torch.float64))[0] for zz, tt in ends]
        fd.append((vs[0] - vs[1]) / (2 * h))
    fd = torch.cat(fd).detach()
    torch.testing.assert_close(dv, fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()))
    assert dv.abs().min() > 1e-3 and (dv - ndm.ode_drift(z, t + 1e-3)[0]).abs().max() > 1e-2  # not vacuous


def test_curvature_penalty_gradient_matches_finite_differences(one_thread) -> None:
    """The penalty's parameter gradient runs reverse over two nested forward modes, through the tangent v."""
    ndm = tiny_toy(hidden=8)
    x = sample_data("moons", 8, torch.Generator().manual_seed(0)).double()

    def penalty() -> torch.Tensor:
        return curvature_penalty(ndm, x, Noise.from_generator(torch.Generator().manual_seed(4), 8)).mean()

    for p in (ndm.transform.net.inp.weight, ndm.denoiser.net.out.weight):
        (grad,) = torch.autograd.grad(penalty(), p)
        idx, eps = (0, 1), 1e-6
        with torch.no_grad():
            p[idx] += eps
            up = penalty()
            p[idx] -= 2 * eps
            down = penalty()
            p[idx] += eps
        assert float(grad[idx]) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_on_2d_data(name: str) -> None:
    ndm = tiny_toy(dtype=torch.float32, scale=0.05)
    kwargs = {"rtol": 1e-2, "atol": 1e-2} if name == "ode_rk45" else {}
    res = SAMPLERS[name](ndm, (7, 2), torch.Generator().manual_seed(0), 4, **kwargs)
    assert res.x.shape == (7, 2) and torch.isfinite(res.x).all() and res.nfe_f == res.nfe_xhat > 0


def test_ode_paths_end_where_the_heun_sampler_ends() -> None:
    ndm = tiny_toy(dtype=torch.float32, scale=0.05)
    z_1 = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    ts, path = ode_paths(ndm, z_1, 10)
    res = SAMPLERS["ode_heun"](ndm, (5, 2), torch.Generator().manual_seed(3), 10)
    assert path.shape == (11, 5, 2) and torch.equal(path[0], z_1) and torch.equal(path[-1], res.z_0)
    assert ts[0] == 1 and ts[-1] == 0


@pytest.fixture
def one_thread():
    """Tiny MLPs: two threads only contend on the small matmuls (10x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- training --------------------------------------------------------------------------------------------------


def _quality(ndm) -> tuple[float, float]:
    """(energy distance of samples to data, mean straightness of the paths), by 50 Heun steps."""
    test = sample_data("8gaussians", 500, torch.Generator().manual_seed(99))
    z_1 = torch.randn(500, 2, generator=torch.Generator().manual_seed(7))
    path = ode_paths(ndm, z_1, 50)[1]
    return energy_distance(ndm.decode_z0(path[-1]), test), float(straightness(path).mean())


def test_short_training_lowers_the_nelbo_and_learns_the_data(one_thread) -> None:
    ndm = build_toy_ndm("identity", hidden=64, depth=2)
    test = sample_data("8gaussians", 500, torch.Generator().manual_seed(99))
    noise = energy_distance(torch.randn(500, 2, generator=torch.Generator().manual_seed(7)), test)  # 0.063
    ema, log = train_toy(ndm, "8gaussians", 600, batch_size=128, lr=3e-3, progress=False)
    first, last = (sum(r["nelbo"] for r in rows) / len(rows) for rows in (log[:20], log[-50:]))
    after, _ = _quality(ema)
    assert last < first - 4.0, (first, last)
    assert after < 0.5 * noise, (noise, after)  # 0.018 here; a second draw of the data scores 0.005


def test_curvature_penalty_straightens_the_paths(one_thread) -> None:
    kw = dict(batch_size=128, lr=3e-3, progress=False, curvature_batch=64)
    plain, _ = train_toy(build_toy_ndm("neural", hidden=32, depth=2), "8gaussians", 250, **kw)
    straight, log = train_toy(build_toy_ndm("neural", hidden=32, depth=2), "8gaussians", 250,
                              curvature_weight=1e-3, **kw)
    (_, s_plain), (_, s_straight) = _quality(plain), _quality(straight)
    assert s_straight > s_plain + 0.2, (s_plain, s_straight)
    assert log[-1]["curvature"] < 0.2 * log[0]["curvature"]


def test_penalty_on_phi_only_leaves_the_denoiser_on_the_nelbo(one_thread) -> None:
    kw = dict(batch_size=32, progress=False, curvature_batch=8, grad_clip=math.inf, ema_decay=0.0)
    models = [build_toy_ndm("neural", hidden=16, depth=2) for _ in range(3)]
    for ndm in models:
        perturbed(ndm.transform, 1, 0.1)
    train_toy(models[0], "moons", 1, **kw)
    train_toy(models[1], "moons", 1, curvature_weight=1.0, curvature_params="transform", **kw)
    train_toy(models[2], "moons", 1, curvature_weight=1.0, **kw)
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert same(models[0].denoiser, models[1].denoiser) and not same(models[0].transform, models[1].transform)
    assert not same(models[0].denoiser, models[2].denoiser)
    with pytest.raises(ValueError, match="learned F"):
        train_toy(build_toy_ndm("identity", hidden=16), "moons", 1, curvature_weight=1.0,
                  curvature_params="transform", progress=False)
