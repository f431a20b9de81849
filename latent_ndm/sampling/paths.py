"""Probability-flow ODE paths: how much they bend, and a penalty that straightens them.

The generative ODE dz/dt = v(z, t) (`NDM.ode_drift`, docs/MATH.md section 9) is solved from t = 1 to 0. A path that
is a straight line walked at constant speed is integrated exactly by one Euler step, so the total
time derivative of the drift along the path,

    dv/dt = partial_t v(z, t) + (grad_z v(z, t)) v(z, t),

measures what few-step samplers get wrong. NFDM-OT (Bartosh, Vetrov, Naesseth, "Neural Flow
Diffusion Models", 2024) adds lambda * E ||dv/dt||^2 over z_t ~ q(z_t | x) to the bound to learn
straighter paths; `curvature_penalty` is that term. The functions here take any data shape [B, ...].
"""

from __future__ import annotations

import torch
from torch import Tensor

from latent_ndm.core import process as P
from latent_ndm.core.ndm import NDM
from latent_ndm.core.noise import Noise
from latent_ndm.sampling import ode
from latent_ndm.sampling.samplers import time_grid


def drift_total_derivative(ndm: NDM, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(v, dv/dt) at z [B, ...], times t [B]: the drift and its total derivative along the ODE path.

    One forward-mode JVP of (z, t) -> v with tangents (v, 1). It nests over the JVPs in t inside the
    drift (dF/dt, gamma'), so a network used here needs second-order forward rules; gradients reach
    the parameters through both the JVP and its tangent v (reverse over forward).
    """
    t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0]).contiguous()
    v = ndm.ode_drift(z, t)[0]
    _, dv = torch.func.jvp(lambda zz, tt: ndm.ode_drift(zz, tt)[0], (z, t), (v, torch.ones_like(t)))
    return v, dv


def curvature_penalty(ndm: NDM, x: Tensor, noise: Noise | torch.Generator | None = None) -> Tensor:
    """||dv/dt (z_t, t)||^2 per example [B] (float64) at z_t ~ q(z_t | x), t uniform (stratified).

    z_t = alpha_t F(x, t) + sigma_t eps is reparameterised, so the penalty's gradient also reaches F
    through where the paths are evaluated, as it should for E_q.
    """
    if not isinstance(noise, Noise):
        noise = Noise.from_generator(noise, x.shape[0], x.device)
    t = noise.uniform(x.device)
    eps = noise.normal(x)
    (f,) = ndm.transform_many([(x, t)])
    z = P.marginal_sample(f, ndm.gamma(t), eps)
    _, dv = drift_total_derivative(ndm, z, t)
    return P.sum_except_batch(dv.square()).to(torch.float64)


@torch.no_grad()
def ode_paths(ndm: NDM, z_1: Tensor, steps: int = 100) -> tuple[Tensor, Tensor]:
    """(times [K+1], states [K+1, N, ...]): the probability-flow ODE from z_1 at t = 1 to t = 0 by
    fixed-step Heun on the samplers' time grid (the path `ode_heun` walks from the same z_1)."""
    ts = time_grid(ndm, steps, z_1.device)
    states = [z_1]

    def drift(t: float, z: Tensor) -> Tensor:
        return ndm.ode_drift(z, torch.full((z.shape[0],), t, dtype=torch.float64, device=z.device))[0]

    ode.heun(drift, z_1, ts, lambda k, t, z: states.append(z))
    return ts, torch.stack(states)


def straightness(path: Tensor) -> Tensor:
    """||z_K - z_0|| / sum_k ||z_{k+1} - z_k|| per path, [N] float64, for a path [K+1, N, ...].

    1 for a straight path (at any speed), smaller the more it bends; 2 sqrt(2) / pi for a quarter circle.
    """
    p = path.to(torch.float64).flatten(2)  # [K+1, N, D]
    length = (p[1:] - p[:-1]).norm(dim=-1).sum(0)
    return (p[-1] - p[0]).norm(dim=-1) / length.clamp_min(1e-300)


def velocity_deviation(path: Tensor, ts: Tensor) -> Tensor:
    """int ||dz/dt - chord velocity||^2 dt per path, [N] float64 (rectified flow's and NFDM's straightness,
    0 for a straight path at constant speed), with dz/dt constant on each segment of the path [K+1, N, ...]
    at times ts [K+1]. Unlike `straightness` it also counts changes of speed, which Euler steps feel too."""
    p = path.to(torch.float64).flatten(2)
    dt = (ts[1:] - ts[:-1]).to(torch.float64)  # [K]
    u = (p[1:] - p[:-1]) / dt[:, None, None]  # segment velocities [K, N, D]
    chord = (p[-1] - p[0]) / (ts[-1] - ts[0]).to(torch.float64)
    return ((u - chord).square().sum(-1) * dt.abs()[:, None]).sum(0)
