"""Importance sampling of the diffusion time t for the Monte-Carlo NELBO (the stratified uniforms it
maps come from latent_ndm.core.noise)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _all_gather(x: Tensor) -> Tensor:
    """x from every process, concatenated in rank order (x itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class ImportanceSampler(nn.Module):
    """Piecewise-constant proposal p(t) over `bins` equal bins of [0, 1].

    The second moment E_p[(l(t)/p(t))^2] = sum_k m_k / p_k (m_k = E[l^2 | bin k] / bins) is minimised
    by p_k proportional to sqrt(m_k). m_k is tracked as an EMA of observed squared loss densities,
    and the proposal is mixed with the uniform so that 1/p(t) stays bounded while m is still noisy.
    """

    def __init__(self, bins: int = 100, decay: float = 0.99, uniform_mix: float = 0.1):
        super().__init__()
        if bins < 1 or not 0.0 < uniform_mix <= 1.0:
            raise ValueError("importance sampler: bins must be >= 1 and uniform_mix in (0, 1]")
        self.bins, self.decay, self.uniform_mix = bins, decay, uniform_mix
        self.register_buffer("second_moment", torch.ones(bins, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(bins, dtype=torch.float64))

    def probabilities(self) -> Tensor:
        """Probability mass of each bin (the density on bin k is bins * p_k)."""
        seen = self.seen > 0
        if not seen.any():
            return torch.full_like(self.second_moment, 1.0 / self.bins)
        # A bin not observed yet is given the largest observed moment: never starve it of samples.
        m = torch.where(seen, self.second_moment, self.second_moment[seen].max())
        w = m.clamp_min(0).sqrt()
        learned = w / w.sum()
        return (1 - self.uniform_mix) * learned + self.uniform_mix / self.bins

    def sample(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Map uniforms u [B] to (t, 1/p(t)) by inverting the proposal's CDF (keeps u's stratification)."""
        p = self.probabilities()
        cdf = torch.cumsum(p, 0)
        k = torch.searchsorted(cdf, u.clamp(max=cdf[-1] * (1 - 1e-12)), right=True).clamp(max=self.bins - 1)
        lower = cdf[k] - p[k]
        t = (k + (u - lower) / p[k]) / self.bins
        return t.clamp(0.0, 1.0), 1.0 / (p[k] * self.bins)

    @torch.no_grad()
    def update(self, t: Tensor, loss: Tensor) -> None:
        """Fold observed loss densities l(t) (unweighted by 1/p) into the per-bin second moments.

        Under data parallelism every process folds in the whole global batch, so the proposal stays
        identical across processes and equal to a single-process run's.
        """
        t, loss = _all_gather(t.detach()), _all_gather(loss.detach().to(torch.float64))
        k = (t * self.bins).long().clamp(0, self.bins - 1)
        sq = loss.square()
        total = torch.zeros_like(self.second_moment).index_add_(0, k, sq)
        count = torch.zeros_like(self.seen).index_add_(0, k, torch.ones_like(sq))
        hit = count > 0
        mean = torch.where(hit, total / count.clamp_min(1), self.second_moment)
        # The first observation of a bin replaces the flat initial guess instead of averaging with it.
        first = hit & (self.seen == 0)
        ema = self.decay * self.second_moment + (1 - self.decay) * mean
        self.second_moment.copy_(torch.where(first, mean, torch.where(hit, ema, self.second_moment)))
        self.seen.add_(count)
