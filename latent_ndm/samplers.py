"""Samplers. One signature: sampler(ndm, shape, generator, steps, callback) -> SampleResult.

A reverse step needs both the prediction xhat and the transform F, so samplers take the NDM itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import process as P
from .ndm import NDM


@dataclass
class SampleResult:
    x: Tensor  # samples in model space [N, ...]
    nfe_xhat: int  # denoiser evaluations (batched calls)
    nfe_f: int  # transform evaluations (batched calls; 0 for F = identity)


Callback = Callable[[int, int, Tensor], None]  # (step, total steps, current z)


def time_grid(steps: int, device: torch.device) -> Tensor:
    """t_i = i/steps, i = steps..0, in float64 (decreasing)."""
    return torch.arange(steps, -1, -1, device=device, dtype=torch.float64) / steps


@torch.no_grad()
def ancestral(
    ndm: NDM,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    steps: int | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Ancestral sampling with the model's own posterior, p(z_s|z_t) = q(z_s|z_t, x = xhat(z_t, t)).

    A continuous-time model takes any number of steps; a discrete model defaults to its own T.
    The last step lands on z_0, from which the most likely x under p(x | z_0) is returned.
    """
    steps = steps or ndm.num_steps or 1000
    device = next(ndm.parameters()).device
    ts = time_grid(steps, device)
    z = torch.randn(shape, generator=generator, device=device)
    nfe_f = 0
    for k in range(steps):
        t, s = ts[k].expand(shape[0]), ts[k + 1].expand(shape[0])
        gamma_t, gamma_s = ndm.gamma(t), ndm.gamma(s)
        xh = ndm.xhat(z, t)
        f_s, f_t = ndm.transform_many([(xh, s), (xh, t)])
        nfe_f += 0 if ndm.transform.is_identity else 1
        mean = P.posterior_mean(f_s, f_t, z, gamma_s, gamma_t)
        _, v = P.posterior_coefficients(gamma_s, gamma_t)
        noise = torch.randn(shape, generator=generator, device=device)
        z = mean + P.expand(v.sqrt(), z) * noise
        if callback is not None:
            callback(k + 1, steps, z)
    return SampleResult(ndm.decode_z0(z), nfe_xhat=steps, nfe_f=nfe_f)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {"ancestral": ancestral}
