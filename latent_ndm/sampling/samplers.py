"""Samplers, all with one signature:

    sampler(ndm, shape, generator=None, steps=None, callback=None, temperature=1.0) -> SampleResult

A reverse step needs both the prediction xhat and the transform F, so samplers take the NDM itself.
Each runs from z_1 ~ N(0, temperature^2 I) to z_0 and returns the most likely x under p(x | z_0).
temperature < 1 (e.g. 0.8) starts the reverse process nearer the prior's centre: with the deterministic
samplers it contracts the model's distribution around its typical samples (for Gaussian data exactly by
the factor temperature), trading diversity for cleaner samples; the stochastic samplers re-inject
untempered noise, so there it mostly fades. It is a sampling choice only: no likelihood depends on it.
Function evaluations are counted separately for the denoiser (xhat) and the transform (F; a JVP counts once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from latent_ndm.core import process as P
from latent_ndm.core.ndm import NDM
from latent_ndm.core.noise import keyed_generator
from latent_ndm.sampling import ode


@dataclass
class SampleResult:
    x: Tensor  # samples in model space [N, ...]
    nfe_xhat: int  # denoiser evaluations (batched calls)
    nfe_f: int  # transform evaluations (batched calls; 0 for F = identity)
    z_0: Tensor | None = None  # the final latent state


Callback = Callable[[int, int, Tensor, Tensor], None]  # (step, total steps, z, xhat at that step)


class _Counter:
    """Counts the NDM's denoiser and transform calls during one sampler run."""

    def __init__(self, ndm: NDM):
        self.ndm, self.xhat, self.f = ndm, 0, 0
        self.last_xhat: Tensor | None = None  # for callbacks of the ODE solvers

    def count(self, xhat: int = 0, f: int = 0) -> None:
        self.xhat += xhat
        self.f += 0 if self.ndm.transform.is_identity else f


def time_grid(ndm: NDM, steps: int, device: torch.device) -> Tensor:
    """Decreasing times from 1 to 0 in float64: uniform for continuous-time models; for a model
    trained with T steps, `steps` points of its own grid i/T (all of it when steps = T)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps, -1, -1, device=device, dtype=torch.float64)
    if ndm.num_steps > 0:
        if steps > ndm.num_steps:
            raise ValueError(f"a model trained with T={ndm.num_steps} can take at most {ndm.num_steps} steps")
        return torch.round(k * ndm.num_steps / steps) / ndm.num_steps
    return k / steps


def _setup(ndm: NDM, shape: tuple[int, ...], generator: torch.Generator | None, steps: int | None,
           temperature: float = 1.0):
    if len(shape) < 2:
        raise ValueError(f"shape must be [N, ...], got {shape}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    device = ndm.device
    steps = steps or ndm.num_steps or 100
    z = randn(shape, generator, device)
    return device, steps, z if temperature == 1.0 else temperature * z


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normals on `device`, drawn by `generator` wherever it lives: a CPU generator with a GPU model
    draws on the CPU and copies (the same numbers as on a CPU machine)."""
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    return torch.randn(shape, generator=generator, device=device)


def _discrete_steps(
    ndm: NDM, shape, generator, steps, callback, eta: float, temperature: float
) -> SampleResult:
    device, steps, z = _setup(ndm, shape, generator, steps, temperature)
    ts, n = time_grid(ndm, steps, device), _Counter(ndm)
    for k in range(steps):
        t, s = ts[k].expand(shape[0]), ts[k + 1].expand(shape[0])
        gamma_t, gamma_s = ndm.gamma(t), ndm.gamma(s)
        xh = ndm.xhat(z, t)
        f_s, f_t = ndm.transform_many([(xh, s), (xh, t)])
        n.count(xhat=1, f=1)
        z_mean = P.posterior_mean(f_s, f_t, z, gamma_s, gamma_t, eta)
        if eta > 0:
            _, var = P.reverse_step_coefficients(gamma_s, gamma_t, eta)
            z = z_mean + P.expand(var.sqrt(), z) * randn(shape, generator, device)
        else:
            z = z_mean
        if callback is not None:
            callback(k + 1, steps, z, xh)
    return SampleResult(ndm.decode_z0(z), n.xhat, n.f, z)


@torch.no_grad()
def ancestral(ndm: NDM, shape, generator=None, steps=None, callback=None, temperature=1.0) -> SampleResult:
    """Ancestral sampling with the model's posterior: p(z_s|z_t) = q(z_s | z_t, x = xhat(z_t, t))."""
    return _discrete_steps(ndm, shape, generator, steps, callback, eta=1.0, temperature=temperature)


@torch.no_grad()
def deterministic(ndm: NDM, shape, generator=None, steps=None, callback=None, temperature=1.0) -> SampleResult:
    """The posterior step with variance 0 (DDIM-like):
    z_s = alpha_s F(xhat, s) + sigma_s/sigma_t (z_t - alpha_t F(xhat, t))."""
    return _discrete_steps(ndm, shape, generator, steps, callback, eta=0.0, temperature=temperature)


@torch.no_grad()
def sde(ndm: NDM, shape, generator=None, steps=None, callback=None, temperature=1.0) -> SampleResult:
    """Reverse SDE by Euler-Maruyama: drift = ODE drift - g^2/2 * score, diffusion g, g^2 = sigma^2 gamma'."""
    device, steps, z = _setup(ndm, shape, generator, steps, temperature)
    ts, n = time_grid(ndm, steps, device), _Counter(ndm)
    for k in range(steps):
        t = ts[k].expand(shape[0])
        h = float(ts[k] - ts[k + 1])
        drift, xh, f, gamma, dgamma = ndm.ode_drift(z, t)
        n.count(xhat=1, f=1)
        g2 = torch.sigmoid(gamma) * dgamma
        drift = drift - P.expand(0.5 * g2, z) * P.score(f, z, gamma)
        noise = randn(shape, generator, device)
        z = z - h * drift + P.expand((g2 * h).sqrt(), z) * noise
        if callback is not None:
            callback(k + 1, steps, z, xh)
    return SampleResult(ndm.decode_z0(z), n.xhat, n.f, z)


def _ode_drift_fn(ndm: NDM, n: _Counter, batch: int) -> ode.Drift:
    def drift(t: float, z: Tensor) -> Tensor:
        n.count(xhat=1, f=1)
        drift, xh, *_ = ndm.ode_drift(z, torch.full((batch,), t, dtype=torch.float64, device=z.device))
        n.last_xhat = xh
        return drift

    return drift


@torch.no_grad()
def ode_euler(ndm: NDM, shape, generator=None, steps=None, callback=None, temperature=1.0) -> SampleResult:
    """Probability-flow ODE from t = 1 to 0 with fixed-step Euler (1 drift evaluation per step): the
    few-step sampler of straight flows, on `ode_heun`'s time grid and drift (its predictor step)."""
    device, steps, z = _setup(ndm, shape, generator, steps, temperature)
    ts, n = time_grid(ndm, steps, device), _Counter(ndm)
    drift = _ode_drift_fn(ndm, n, shape[0])
    for k in range(steps):
        t, s = float(ts[k]), float(ts[k + 1])
        z = z + (s - t) * drift(t, z)
        if callback is not None:
            callback(k + 1, steps, z, n.last_xhat)
    return SampleResult(ndm.decode_z0(z), n.xhat, n.f, z)


@torch.no_grad()
def ode_heun(ndm: NDM, shape, generator=None, steps=None, callback=None, temperature=1.0) -> SampleResult:
    """Probability-flow ODE from t = 1 to 0 with fixed-step Heun (2 drift evaluations per step)."""
    device, steps, z = _setup(ndm, shape, generator, steps, temperature)
    n = _Counter(ndm)
    cb = None if callback is None else (lambda k, t, zz: callback(k, steps, zz, n.last_xhat))
    res = ode.heun(_ode_drift_fn(ndm, n, shape[0]), z, time_grid(ndm, steps, device), cb)
    return SampleResult(ndm.decode_z0(res.z), n.xhat, n.f, res.z)


@torch.no_grad()
def ode_rk45(ndm: NDM, shape, generator=None, steps=None, callback=None, temperature=1.0, rtol: float = 1e-4,
             atol: float = 1e-4):
    """Probability-flow ODE from t = 1 to 0 with adaptive RK45; `steps` sets only the first step (1/steps)."""
    device, steps, z = _setup(ndm, shape, generator, steps, temperature)
    n = _Counter(ndm)
    cb = None if callback is None else (lambda k, t, zz: callback(k, 0, zz, n.last_xhat))
    res = ode.rk45(_ode_drift_fn(ndm, n, shape[0]), z, 1.0, 0.0, rtol, atol, first_step=1.0 / steps, callback=cb)
    return SampleResult(ndm.decode_z0(res.z), n.xhat, n.f, res.z)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "ancestral": ancestral,
    "deterministic": deterministic,
    "sde": sde,
    "ode_euler": ode_euler,
    "ode_heun": ode_heun,
    "ode_rk45": ode_rk45,
}


def get_sampler(name: str) -> Callable[..., SampleResult]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample_images(ndm: NDM, n: int, sampler: str = "ancestral", steps: int | None = None,
                  generator: torch.Generator | None = None, batch_size: int = 256,
                  seed: int | None = None, temperature: float = 1.0) -> tuple[Tensor, dict]:
    """n samples in model space in batches of batch_size, with NFE totals; see SAMPLERS for the names
    and the module's docstring for `temperature`.

    seed: batch j draws from a generator keyed by (seed, j) on the model's device, and under
    torch.distributed process r samples batches r, r + W, ... and all get every sample, in order: the
    samples are bitwise those of one process with the same seed and batch size. Without a seed, one
    `generator` (or the global RNG) draws all batches in one process.
    """
    fn = get_sampler(sampler)
    shape = tuple(ndm.data_shape)
    starts = list(range(0, n, batch_size))
    rank, world = (dist.get_rank(), dist.get_world_size()) if seed is not None and dist.is_available() \
        and dist.is_initialized() else (0, 1)
    xs, nfe_x, nfe_f = {}, 0, 0
    for j in range(rank, len(starts), world):
        g = generator if seed is None else keyed_generator(ndm.device, seed, "sample", j)
        res = fn(ndm, (min(batch_size, n - starts[j]), *shape), g, steps, temperature=temperature)
        xs[j] = res.x
        nfe_x, nfe_f = nfe_x + res.nfe_xhat, nfe_f + res.nfe_f
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, ({j: x.cpu() for j, x in xs.items()}, nfe_x, nfe_f))
        xs = {j: x.to(ndm.device) for part in parts for j, x in part[0].items()}
        nfe_x, nfe_f = sum(p[1] for p in parts), sum(p[2] for p in parts)
    batches = len(starts)
    return torch.cat([xs[j] for j in range(batches)]), {"nfe_xhat": nfe_x // batches, "nfe_f": nfe_f // batches}
