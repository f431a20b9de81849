"""Noise schedules as the log noise-to-signal ratio gamma(t), increasing on t in [0, 1].

alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 = sigmoid(gamma(t)), SNR(t) = exp(-gamma(t)). Every
schedule returns float64: the posterior variances near t = 0 and between close times are
differences of nearly equal numbers, which float32 loses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Schedule(nn.Module):
    """gamma(t) in float64; `gamma_and_derivative` adds d gamma / dt by forward-mode AD."""

    def forward(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gamma_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.to(torch.float64).contiguous()  # an expanded t cannot carry a dual tangent
        # The tangent keeps autograd history, so a learnable schedule is trained through gamma'.
        return torch.func.jvp(self.forward, (t,), (torch.ones_like(t),))


class LinearGamma(Schedule):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t."""

    def __init__(self, gamma_min: float = -10.0, gamma_max: float = 10.0):
        super().__init__()
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def forward(self, t: Tensor) -> Tensor:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t.to(torch.float64)


class CosineGamma(Schedule):
    """Cosine schedule (Nichol & Dhariwal): alpha = cos(pi u / 2), gamma = 2 log tan(pi u / 2),
    with u(t) linear in t and clipped so that gamma(0) = gamma_min and gamma(1) = gamma_max."""

    def __init__(self, gamma_min: float = -10.0, gamma_max: float = 10.0):
        super().__init__()
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.u0 = 2 / math.pi * math.atan(math.exp(gamma_min / 2))
        self.u1 = 2 / math.pi * math.atan(math.exp(gamma_max / 2))

    def forward(self, t: Tensor) -> Tensor:
        u = self.u0 + (self.u1 - self.u0) * t.to(torch.float64)
        return 2 * torch.log(torch.tan(math.pi / 2 * u))


class _PositiveLinear(nn.Module):
    """Linear layer with softplus-positive weights, so the network is monotone in its input."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.double()
        return F.linear(x, F.softplus(self.weight.double()), bias)


class LearnedGamma(Schedule):
    """VDM's learnable monotone schedule: a monotone network rescaled to learnable endpoints.

    gamma(t) = g0 + (g1 - g0) * (h(t) - h(0)) / (h(1) - h(0)), h(t) = l1(t) + l3(sigmoid(l2(l1(t)))),
    with l1, l2, l3 positive-weight linear layers (so h is increasing) and g0 < g1 learnable.
    """

    def __init__(self, gamma_min: float = -10.0, gamma_max: float = 10.0, hidden: int = 1024):
        super().__init__()
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)))
        # g1 = g0 + softplus(log_range) keeps the endpoints ordered while both are learned.
        r = gamma_max - gamma_min
        self.log_range = nn.Parameter(torch.tensor(math.log(math.expm1(r))))
        self.l1 = _PositiveLinear(1, 1)
        self.l2 = _PositiveLinear(1, hidden)
        self.l3 = _PositiveLinear(hidden, 1, bias=False)  # a constant would cancel in the normalisation

    def _h(self, t: Tensor) -> Tensor:
        a = self.l1(t[..., None])
        return (a + self.l3(torch.sigmoid(self.l2(a)))).squeeze(-1)

    def forward(self, t: Tensor) -> Tensor:
        t = t.to(torch.float64)
        ends = self._h(torch.tensor([0.0, 1.0], dtype=torch.float64, device=t.device))
        frac = (self._h(t) - ends[0]) / (ends[1] - ends[0])
        g0 = self.gamma_0.double()
        return g0 + F.softplus(self.log_range.double()) * frac
