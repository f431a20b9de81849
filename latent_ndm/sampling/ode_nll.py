"""Exact negative log-likelihood through the probability-flow ODE (FFJORD / score-SDE style).

log p_0(z_0) = log p_1(z_1) + int_0^1 div f(z_t, t) dt, integrating z and the divergence from the data
to t = 1 with RK45. div f is estimated by Hutchinson's trace estimator with K fixed probes per
example (Rademacher by default): E[eps^T (df/dz) eps] = tr(df/dz), with eps^T df/dz by reverse-mode AD.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latent_ndm.core import process as P
from latent_ndm.core.ndm import NDM
from latent_ndm.sampling import ode


def _probes(shape: tuple[int, ...], k: int, kind: str, generator: torch.Generator | None, device) -> Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, (k, *shape), generator=generator, device=device).float() * 2 - 1
    if kind == "gaussian":
        return torch.randn((k, *shape), generator=generator, device=device)
    if kind == "exact":  # the D basis vectors: the exact trace, for small D (tests, toy data)
        d = math.prod(shape[1:])
        return torch.eye(d, device=device).reshape(d, 1, *shape[1:]).expand(d, *shape).contiguous() * math.sqrt(d)
    raise ValueError(f"probe kind must be 'rademacher', 'gaussian' or 'exact', got {kind!r}")


def drift_and_divergence(ndm: NDM, z: Tensor, t: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """The probability-flow drift at (z, t) and its Hutchinson divergence, averaged over probes [K, B, ...].

    eps^T (df/dz) comes from reverse mode: the drift already holds a forward-mode dF/dt, and
    forward-over-forward fails on ops without second-order forward rules (silu_backward), while
    reverse-over-forward is the combination training relies on.
    """
    div = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        drift = ndm.ode_drift(z, t)[0]
        for k, e in enumerate(probes):
            (ej,) = torch.autograd.grad(drift, z, e, retain_graph=k < len(probes) - 1)
            div = div + P.sum_except_batch(ej * e).double() / len(probes)
    return drift.detach(), div


@torch.no_grad()
def ode_nll(
    ndm: NDM,
    x: Tensor,
    generator: torch.Generator | None = None,
    probes: int = 1,
    probe_kind: str = "rademacher",
    dequantize: bool | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    probe_vectors: Tensor | None = None,
    dequantize_uniforms: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """-log p(x) in nats per example [B] (float64), and {'nfe', 'steps'} of the solve.

    x: data in model space. For 8-bit data (dequantize defaults to the discrete likelihood) x is
    dequantised uniformly within its bin of width 2/256: the result is then a density on [-1, 1]^D,
    and bits/dim on the 0..255 scale are nats/(D ln 2) + 7 (evaluation/nelbo.py adds D log 128 nats). Continuous data
    (latents) are not dequantised: the result is their density.
    z_0 = alpha_0 x (its sigma_0 noise, ~1e-3 here, is neglected as in VDM and score-SDE likelihoods).
    probe_vectors: Hutchinson probes [K, B, ...] to use instead of drawing `probes` of `probe_kind`
    from `generator` (e.g. keyed per example); dequantize_uniforms: U[0, 1) like x for the dequantisation,
    instead of draws from `generator`.
    """
    was_training = ndm.training
    ndm.eval()
    dequantize = ndm.likelihood.dequantize if dequantize is None else dequantize
    b, device = x.shape[0], x.device
    x = x.to(torch.float32)
    if dequantize:
        u = torch.rand(x.shape, generator=generator, device=device) if dequantize_uniforms is None \
            else dequantize_uniforms.to(device, x.dtype)
        x = x + (u - 0.5) * (2 / 256)
    zeros = torch.zeros(b, dtype=torch.float64, device=device)
    alpha_0, _ = P.alpha_sigma(ndm.gamma(zeros))
    z0 = P.expand(alpha_0, x) * x
    eps = _probes(x.shape, probes, probe_kind, generator, device) if probe_vectors is None \
        else probe_vectors.to(device, x.dtype)  # [K, B, ...]
    dims = x[0].numel()
    counter = {"nfe": 0}

    def augmented(t: float, state: Tensor) -> Tensor:
        z = state[:, :dims].reshape(x.shape).to(x.dtype)
        ts = torch.full((b,), t, dtype=torch.float64, device=device)
        counter["nfe"] += 1
        drift, div = drift_and_divergence(ndm, z, ts, eps)
        return torch.cat([drift.reshape(b, dims).double(), div[:, None]], dim=1)

    # The augmented state runs in float64 so that the tolerance applies to the divergence integral too.
    state = torch.cat([z0.reshape(b, dims).double(), torch.zeros(b, 1, dtype=torch.float64, device=device)], 1)
    res = ode.rk45(lambda t, s: augmented(t, s.to(torch.float64)), state, 0.0, 1.0, rtol, atol)
    z1, div_integral = res.z[:, :dims], res.z[:, dims]
    log_p1 = -0.5 * (z1.square().sum(1) + dims * math.log(2 * math.pi))
    # log p(x) = log p_0(alpha_0 x) + D log alpha_0 (change of variables z_0 = alpha_0 x).
    log_px = log_p1 + div_integral + dims * torch.log(alpha_0)
    ndm.train(was_training)
    return -log_px, {"nfe": counter["nfe"], "steps": res.steps}

