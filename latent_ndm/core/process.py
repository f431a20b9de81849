"""The NDM process and its NELBO terms as pure tensor functions (no parameters, no configs).

Notation follows docs/MATH.md and Bartosh et al. (2023): gamma is the log noise-to-signal ratio,
alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma). Coefficients are computed in float64 and
cast to the data's dtype only when they meet the data. Per-example terms are summed over all data
dimensions and returned in nats, shape [B].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def expand(c: Tensor, x: Tensor) -> Tensor:
    """A per-example coefficient [B] as [B, 1, ..., 1] in x's dtype, to broadcast against x."""
    return c.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def sum_except_batch(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * expand(scale, grad), None


def scale_grad(x: Tensor, scale: Tensor) -> Tensor:
    """x unchanged; its gradient multiplied by a per-example scale [B] (reweights one path of a loss)."""
    return _ScaleGrad.apply(x, scale)


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t, sigma_t of the variance-preserving process."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def marginal_sample(f_t: Tensor, gamma_t: Tensor, eps: Tensor) -> Tensor:
    """z_t ~ q(z_t | x) = N(alpha_t F(x,t), sigma_t^2 I), reparameterised with eps."""
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    return expand(alpha_t, f_t) * f_t + expand(sigma_t, eps) * eps


def posterior_coefficients(gamma_s: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor]:
    """(c, v) of q(z_s | z_t, x) = N(alpha_s F(x,s) + c (z_t - alpha_t F(x,t)), v I), s < t.

    sigma_{t|s}^2 = sigma_t^2 - alpha_t^2/alpha_s^2 sigma_s^2 = -expm1(softplus(g_s) - softplus(g_t)),
    v = sigma_{t|s}^2 sigma_s^2 / sigma_t^2 and c = sqrt(sigma_s^2 - v)/sigma_t, which simplifies to
    (alpha_t/alpha_s) sigma_s^2/sigma_t^2 (DDPM's coefficient of z_t) without a cancelling difference.
    """
    sigma2_ts = -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t))
    ratio = torch.sigmoid(gamma_s) / torch.sigmoid(gamma_t)  # sigma_s^2 / sigma_t^2
    v = sigma2_ts * ratio
    alpha_ts = torch.exp(0.5 * (F.softplus(gamma_s) - F.softplus(gamma_t)))  # alpha_t / alpha_s
    return alpha_ts * ratio, v


def reverse_step_coefficients(gamma_s: Tensor, gamma_t: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(c, var) of a reverse step with variance eta^2 v: eta = 1 is the posterior, eta = 0 the
    deterministic (DDIM-like) step with c = sigma_s/sigma_t. Marginals are kept for any eta in [0, 1]:
    c = sqrt(sigma_s^2 - eta^2 v)/sigma_t, written as sqrt(c_1^2 + (1 - eta^2) v/sigma_t^2)."""
    c1, v = posterior_coefficients(gamma_s, gamma_t)
    if eta == 1.0:
        return c1, v
    c = torch.sqrt(c1.square() + (1 - eta**2) * v / torch.sigmoid(gamma_t))
    return c, eta**2 * v


def posterior_mean(
    f_s: Tensor, f_t: Tensor, z_t: Tensor, gamma_s: Tensor, gamma_t: Tensor, eta: float = 1.0
) -> Tensor:
    """Mean of q(z_s | z_t, x) given F(x,s) = f_s and F(x,t) = f_t (the reverse step uses xhat);
    eta < 1 gives the mean of the reduced-variance step of `reverse_step_coefficients`."""
    c, _ = reverse_step_coefficients(gamma_s, gamma_t, eta)
    alpha_s, _ = alpha_sigma(gamma_s)
    alpha_t, _ = alpha_sigma(gamma_t)
    return expand(alpha_s, f_s) * f_s + expand(c, z_t) * (z_t - expand(alpha_t, f_t) * f_t)


def diffusion_kl(d_s: Tensor, d_t: Tensor, gamma_s: Tensor, gamma_t: Tensor) -> Tensor:
    """KL(q(z_s|z_t,x) || p(z_s|z_t)) of one step, in nats, [B].

    docs/MATH.md, section 5.1: ||alpha_s d_s - c alpha_t d_t||^2 / (2v), with d_u = F(x,u) - F(xhat,u). Written as
    alpha_s (d_s - d_t) + alpha_s (1 - SNR_t/SNR_s) d_t: the same vector, because
    c alpha_t = alpha_s SNR_t/SNR_s, but free of the cancellation between two O(1) terms when
    s and t are close (for F = identity the first part is exactly zero).
    """
    _, v = posterior_coefficients(gamma_s, gamma_t)
    alpha_s, _ = alpha_sigma(gamma_s)
    b = alpha_s * -torch.expm1(gamma_s - gamma_t)  # alpha_s (1 - SNR_t / SNR_s)
    diff = expand(alpha_s, d_s) * (d_s - d_t) + expand(b, d_t) * d_t
    # 1/(2v) is applied after the sum, in float64: for T = 10^4, v is ~1e-4 and the KL small.
    return sum_except_batch(diff.square()).to(torch.float64) / (2 * v)


def diffusion_loss_continuous(d: Tensor, d_dot: Tensor, gamma: Tensor, dgamma: Tensor) -> Tensor:
    """Continuous-time diffusion loss density at t, in nats, [B] (the integrand over t in [0,1]).

    docs/MATH.md, section 6: 1/2 exp(-gamma) gamma' || d - d_dot / gamma' ||^2, d = F(x,t) - F(xhat,t) and
    d_dot = Fdot(x,t) - Fdot(xhat,t). With F = identity, d_dot = 0 and this is VDM's loss.
    """
    inner = d - expand(1.0 / dgamma, d_dot) * d_dot
    return 0.5 * torch.exp(-gamma) * dgamma * sum_except_batch(inner.square()).to(torch.float64)


def prior_kl(f_1: Tensor, gamma_1: Tensor) -> Tensor:
    """KL(N(alpha_1 F(x,1), sigma_1^2 I) || N(0, I)) in nats, [B]."""
    alpha2, sigma2 = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
    d = f_1[0].numel()
    mean_sq = sum_except_batch(f_1.square()).to(torch.float64)
    # log sigma_1^2 = -softplus(-gamma_1), stable for any gamma_1.
    return 0.5 * (d * (sigma2 + F.softplus(-gamma_1) - 1.0) + alpha2 * mean_sq)


def ode_drift(f: Tensor, f_dot: Tensor, z: Tensor, gamma: Tensor, dgamma: Tensor) -> Tensor:
    """Probability-flow ODE drift dz/dt = alpha' F + alpha Fdot + (sigma'/sigma)(z - alpha F), F = F(xhat, t).

    With alpha^2 = sigmoid(-gamma): alpha' = -alpha sigma^2 gamma'/2 and sigma'/sigma = alpha^2 gamma'/2.
    """
    alpha, sigma = alpha_sigma(gamma)
    d_alpha = -0.5 * alpha * sigma.square() * dgamma
    sigma_rate = 0.5 * alpha.square() * dgamma
    return expand(d_alpha, f) * f + expand(alpha, f) * f_dot + expand(sigma_rate, z) * (z - expand(alpha, f) * f)


def score(f: Tensor, z: Tensor, gamma: Tensor) -> Tensor:
    """Model score s = -(z - alpha F(xhat, t)) / sigma^2."""
    alpha, _ = alpha_sigma(gamma)
    return -(z - expand(alpha, f) * f) / expand(torch.sigmoid(gamma), z)


def bin_centres(device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 256 bin centres of 8-bit data in [-1, 1]: -1 + (2k + 1)/256."""
    return (torch.arange(256, device=device, dtype=dtype) * 2 + 1) / 256 - 1


def to_bin_index(x: Tensor) -> Tensor:
    """Inverse of `bin_centres` for data already on the centres."""
    return ((x + 1) * 128 - 0.5).round().clamp(0, 255).long()


def bin_window(log_var: float, tail: float = 2.0 ** -40) -> int:
    """How many of the 256 bins around the nearest one carry all of p(x | z_0) but `tail`.

    With s^2 = sigma_0^2 / alpha_0^2 = exp(gamma_0) and bin width d = 2/256, a bin m >= K + 1 places from
    z_0's nearest bin has a logit at least K(K + 1) d^2 / (2 s^2) below that bin's, so the <= 255 bins
    outside a window of radius K add at most 255 exp(-K(K + 1) d^2 / (2 s^2)) to the normaliser, relative
    to its largest term. The window is the smallest with that <= tail (2^-40, far below float32's 2^-24):
    3 bins at VDM's gamma_0 = -13.3, all 256 only once s exceeds a few bins.
    """
    need = 2.0 * math.exp(log_var) * math.log(255.0 / tail) / (2.0 / 256) ** 2  # K(K + 1) >= need
    radius = math.ceil((math.sqrt(1.0 + 4.0 * need) - 1.0) / 2.0)
    return min(2 * radius + 1, 256)


def reconstruction_nll_discrete(x: Tensor, z_0: Tensor, gamma_0: Tensor) -> Tensor:
    """-log p(x | z_0) for 8-bit data on the bin centres, in nats, [B] (VDM's exact discrete decoder).

    p(x = y_k | z_0) = softmax_k( -(z_0 - alpha_0 y_k)^2 / (2 sigma_0^2) ), independently per dimension.
    The normaliser sums over the window of bins around z_0/alpha_0 that holds all its mass but 2^-40
    (`bin_window`): the same value as the 256-bin sum in float32, at a small fraction of its cost, which
    on a CPU was a third of a baseline training step (exp of large negative logits is a slow path).
    """
    alpha_0, sigma_0 = alpha_sigma(gamma_0)
    z = z_0.to(torch.promote_types(z_0.dtype, torch.float32))  # bf16 cannot resolve sigma_0 ~ 1e-3
    a = expand(alpha_0, z)
    inv_2var = expand(0.5 / sigma_0.square(), z)
    n = bin_window(gamma_0.detach().max().item())
    with torch.no_grad():  # the window's placement: a choice of summands, not a function to differentiate
        nearest = to_bin_index((z / a).clamp(-1, 1))
        first = (nearest - n // 2).clamp(0, 256 - n)
        window = first.unsqueeze(-1) + torch.arange(n, device=z.device)  # [B, ..., n]
    centres = bin_centres(x.device, z.dtype)
    logit_x = -(z - a * centres[to_bin_index(x)]).square() * inv_2var
    logits = -(z.unsqueeze(-1) - a.unsqueeze(-1) * centres[window]).square() * inv_2var.unsqueeze(-1)
    logp = logit_x - logits.logsumexp(-1)
    return -sum_except_batch(logp).to(torch.float64)


def reconstruction_nll_gaussian(x: Tensor, z_0: Tensor, gamma_0: Tensor) -> Tensor:
    """-log N(x; z_0/alpha_0, sigma_0^2/alpha_0^2 I) for continuous data, in nats, [B]."""
    d = x[0].numel()
    alpha_0, _ = alpha_sigma(gamma_0)
    # sigma_0^2 / alpha_0^2 = exp(gamma_0).
    sq = sum_except_batch((x - z_0 / expand(alpha_0, z_0)).square()).to(torch.float64)
    return 0.5 * (sq * torch.exp(-gamma_0) + d * (gamma_0 + math.log(2 * math.pi)))


def bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    return nats / (num_dims * math.log(2))
