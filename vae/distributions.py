"""The VAE posterior q(z | x): a diagonal Gaussian with per-example KL, log-density and entropy.

Per-example quantities are summed over every non-batch dimension and returned in nats, shape [B].
Elementwise terms stay in the input dtype; the per-example sum accumulates in float32 or wider,
because a bf16 sum over a 4x32x32 latent loses whole nats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


def _sum_per_example(x: Tensor) -> Tensor:
    """[B, ...] -> [B], accumulated in float32 or wider."""
    return x.flatten(1).sum(1, dtype=torch.promote_types(x.dtype, torch.float32))


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector [C] as [1, C, 1, ..., 1] in like's dtype and device (channel = dim 1)."""
    if v.dim() != 1 or like.dim() < 2 or v.shape[0] != like.shape[1]:
        raise ValueError(f"expected a per-channel vector of shape [{like.shape[1]}], got {tuple(v.shape)}")
    return v.to(like.device, like.dtype).reshape(1, -1, *([1] * (like.dim() - 2)))


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over tensors [B, ...], as output by the VAE encoder.

    Args:
        mean: [B, ...] posterior mean.
        logvar: [B, ...] log-variance, same shape as mean; clamped to [-30, 20].
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape or mean.dim() < 1:
            raise ValueError(f"mean and logvar must have the same shape [B, ...], got {tuple(mean.shape)} "
                             f"and {tuple(logvar.shape)}")
        self._mean = mean
        # An untrained encoder can emit any logvar: exp(20) (std ~2e4) and exp(-30) (std ~3e-7) keep var, 1/var and
        # the KL finite in float32 (and bf16's range) without constraining any sensible posterior. Same bounds as
        # LDM's DiagonalGaussianDistribution; the clamp passes no gradient outside them.
        self._logvar = logvar.clamp(-30.0, 20.0)

    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def logvar(self) -> Tensor:
        return self._logvar

    @property
    def var(self) -> Tensor:
        return self._logvar.exp()

    @property
    def std(self) -> Tensor:
        return (0.5 * self._logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator`."""
        eps = torch.randn(self._mean.shape, generator=generator, device=self._mean.device, dtype=self._mean.dtype)
        return self.reparameterize(eps)

    def reparameterize(self, eps: Tensor) -> Tensor:
        """z = mean + std * eps for given standard normals eps: gradients reach mean and logvar."""
        return self._mean + self.std * eps

    def mode(self) -> Tensor:
        return self._mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar), [B] nats."""
        return 0.5 * _sum_per_example(self._mean.square() + self.var - 1.0 - self._logvar)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) = -1/2 sum((z - mean)^2 / var + logvar + log 2 pi), [B] nats."""
        return -0.5 * _sum_per_example((z - self._mean).square() * (-self._logvar).exp() + self._logvar + _LOG_2PI)

    def entropy(self) -> Tensor:
        """H(q) = 1/2 sum(1 + log 2 pi + logvar), [B] nats."""
        return 0.5 * _sum_per_example(self._logvar + (1.0 + _LOG_2PI))

    def affine(self, shift: Tensor, scale: Tensor) -> DiagonalGaussian:
        """The distribution of (z - shift) / scale for per-channel shift, scale of shape [C] (channel = dim 1).

        This is how the posterior looks in normalised latent space (EDM2/LDM-style latent scale and shift).
        A negative scale flips the sign of the mean; the variance only sees |scale|.
        """
        shift, scale = _per_channel(shift, self._mean), _per_channel(scale, self._mean)
        return DiagonalGaussian((self._mean - shift) / scale, self._logvar - 2.0 * scale.abs().log())
