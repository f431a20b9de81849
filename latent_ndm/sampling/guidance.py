"""Autoguidance (Karras et al., 2024, "Guiding a diffusion model with a bad version of itself").

An unconditional model has no unconditional twin to guide it away from, as classifier-free guidance does; a
weaker model of the same data (an early checkpoint, a smaller network) makes the same kind of errors, only
more of them. Extrapolating from the weak model's prediction through the strong one's,

    xhat_w(z, t) = xhat_guide(z, t) + w (xhat_main(z, t) - xhat_guide(z, t)),    w >= 1,

moves samples away from what the weak model gets wrong: cleaner images at some loss of diversity. With
F = identity, z_t fixed, the score -(z - alpha_t xhat) / sigma_t^2 is affine in xhat, so this is the same
extrapolation of the scores (and of eps); with a learned F it is done where both models predict the same
thing, the data x, and the main model's F carries the guided prediction through the reverse step.

Guidance is a sampling choice: the guided model has no likelihood of its own, and every bound reported is
the main model's. `autoguided` returns an NDM that every sampler takes unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from latent_ndm.core.ndm import NDM


class AutoGuidedDenoiser(nn.Module):
    """xhat_guide + weight (xhat_main - xhat_guide) at the same (z_t, t, gamma_t); weight 1 is the main model."""

    def __init__(self, main: nn.Module, guide: nn.Module, weight: float):
        super().__init__()
        self.main, self.guide, self.weight = main, guide, float(weight)

    def forward(self, z: Tensor, t: Tensor, gamma: Tensor) -> Tensor:
        x_main = self.main(z, t, gamma)
        if self.weight == 1.0:
            return x_main
        x_guide = self.guide(z, t, gamma)
        return x_guide + self.weight * (x_main - x_guide)


def autoguided(ndm: NDM, guide: NDM, weight: float) -> NDM:
    """`ndm` guided away from `guide` with the given weight (see the module): an NDM sharing ndm's schedule,
    transform and likelihood, for any sampler. Both models must diffuse the same space (the same example shape)
    under the same noise schedule, so that z_t means the same to both."""
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"the guidance weight must be a finite number >= 0 (1: no guidance), got {weight}")
    if tuple(ndm.data_shape or ()) != tuple(guide.data_shape or ()):
        raise ValueError(f"the guide diffuses examples of shape {tuple(guide.data_shape or ())}, the model "
                         f"{tuple(ndm.data_shape or ())}: a guide must model the same space")
    t = torch.linspace(0, 1, 65, dtype=torch.float64, device=ndm.device)
    with torch.no_grad():
        g_main, g_guide = ndm.gamma(t), guide.gamma(t.to(guide.device)).to(ndm.device)
    if not torch.allclose(g_main, g_guide, rtol=0, atol=1e-5):
        gap = float((g_main - g_guide).abs().max())
        raise ValueError(f"the guide's noise schedule differs from the model's (|gamma| differs by up to {gap:.3g}): "
                         "z_t would mean different things to the two; guide with a model of the same schedule")
    guided = NDM(ndm.schedule, ndm.transform, AutoGuidedDenoiser(ndm.denoiser, guide.denoiser, weight),
                 ndm.likelihood, ndm.num_steps, ndm.data_shape)
    return guided.eval()
