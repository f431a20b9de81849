"""Distances between two sets of samples [N, ...] (e.g. model samples and held-out data), in float64.

- sliced Wasserstein SW_p: the p-Wasserstein distance of random 1-D projections, averaged as
  (E_theta W_p^p(theta.X, theta.Y))^(1/p), each 1-D distance exact for empirical distributions;
- energy distance (Szekely): 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||, as a V-statistic, so it is
  >= 0 and exactly 0 for identical sets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_directions(num: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """num unit vectors uniform on the sphere in R^dim, [num, dim] float64."""
    d = torch.randn(num, dim, generator=generator, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def wasserstein_1d(a: Tensor, b: Tensor, p: float = 2.0) -> Tensor:
    """W_p^p between the empirical distributions of a [..., n] and b [..., m] along the last dim.

    W_p^p = int_0^1 |Fa^-1(u) - Fb^-1(u)|^p du; both quantile functions are constant between the
    levels i/n and j/m, so the integral is an exact sum over the merged levels (n and m may differ).
    """
    a, b = a.to(torch.float64).sort(-1).values, b.to(torch.float64).sort(-1).values
    n, m = a.shape[-1], b.shape[-1]
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).unique()  # sorted, ends at 1
    width = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - width / 2  # never a multiple of 1/n or 1/m: floor picks the quantile's index
    ia = (mid * n).floor().long().clamp(max=n - 1).to(a.device)
    ib = (mid * m).floor().long().clamp(max=m - 1).to(b.device)
    return ((a[..., ia] - b[..., ib]).abs().pow(p) * width.to(a.device)).sum(-1)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, generator: torch.Generator | None = None,
                       p: float = 2.0) -> float:
    """SW_p(x, y) for sample sets x [N, ...] and y [M, ...], over `projections` random directions."""
    x, y = x.flatten(1).to(torch.float64), y.flatten(1).to(torch.float64)
    theta = random_directions(projections, x.shape[1], generator).to(x.device)  # [P, D]
    per_direction = wasserstein_1d(theta @ x.T, theta @ y.T, p)  # [P]
    return float(per_direction.mean() ** (1 / p))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (V-statistics) of x [N, ...] and y [M, ...]."""
    x, y = x.flatten(1).to(torch.float64), y.flatten(1).to(torch.float64)

    def mean_dist(a: Tensor, b: Tensor) -> Tensor:
        # The direct difference, not the |a|^2 + |b|^2 - 2ab expansion, which loses the small distances.
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").mean()

    return float(2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y))
