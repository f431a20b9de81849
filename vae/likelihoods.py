"""Discrete decoder likelihoods p(x | decoder output) for 8-bit pixels.

Pixel value k in {0, ..., 255} sits at the bin centre x_k = -1 + (2k + 1)/256 in [-1, 1]; bin k is
[x_k - 1/256, x_k + 1/256], except that bin 0 extends to -inf and bin 255 to +inf, so the 256
probabilities of a continuous density discretized this way sum to exactly 1 (as in PixelCNN++,
Salimans et al. 2017).

Decoder outputs are laid out channel-major: params [B, C*P, H, W], channel c reads
params[:, c*P:(c+1)*P], P = `params_per_channel`. Channels are independent given the decoder output:
PixelCNN++'s autoregressive coupling of R -> G -> B means is deliberately not used, because a VAE
decoder already sees the whole latent and every channel can be predicted jointly from it.

All bin masses are computed in log space in standardised units (u = (x - mean) / scale): the edge
bins as log CDF / log survival function, the inner bins through forms that neither underflow far in
the tails nor cancel when the scale is large, so values and gradients stay finite for any mean and
any log-scale >= -7 (the lower clamp, as in PixelCNN++).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_BINS = 256
HALF_BIN = 1.0 / NUM_BINS  # bins are 2/256 wide in [-1, 1]
MIN_LOG_SCALE = -7.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def bin_centres(device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 256 bin centres x_k = -1 + (2k + 1)/256."""
    return (torch.arange(NUM_BINS, device=device, dtype=dtype) * 2 + 1) / NUM_BINS - 1


def bin_index(x: Tensor) -> Tensor:
    """Pixel value k of data on (or near) the bin centres; values outside [-1, 1] land in the edge bins."""
    return ((x + 1) * (NUM_BINS / 2) - 0.5).round().clamp(0, NUM_BINS - 1).long()


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small d; d is floored so that d = 0 stays finite."""
    return torch.log(-torch.expm1(-d.clamp_min(torch.finfo(d.dtype).tiny)))


def _sum_per_example(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1, dtype=torch.promote_types(x.dtype, torch.float32))


class _LogNdtr(torch.autograd.Function):
    """log Phi(u) with a gradient that stays correct far in the lower tail.

    torch's own backward of log_ndtr forms phi(u) / Phi(u) from two numbers of size ~u^2/2 that cancel: in float32
    it is already wrong at u = -1e4 and inf near u = -1.1e5 (a tiny scale with the mean far outside [-1, 1]).
    phi(u) / Phi(u) = sqrt(2/pi) / erfcx(-u / sqrt(2)) has no cancellation anywhere.
    """

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return torch.special.log_ndtr(u)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        return grad * (math.sqrt(2 / math.pi) / torch.special.erfcx(-u * math.sqrt(0.5)))


_log_ndtr = _LogNdtr.apply


class DiscretizedLikelihood:
    """A mixture of M location-scale components per channel, discretized to 256 bins.

    Subclasses supply the standard component (its log CDF, log survival function, log mass of a
    bin in standardised units, and a standard sample); this class does layout, edge bins, mixing,
    sampling and reductions. Without mixture weights (`weighted=False`) M must be 1 and
    params_per_channel = 2 (mean, log-scale); with them params_per_channel = 3M (logits, means, log-scales).
    """

    params_per_channel: int

    def __init__(self, num_mixtures: int, weighted: bool) -> None:
        if num_mixtures < 1 or (not weighted and num_mixtures != 1):
            raise ValueError(f"num_mixtures must be >= 1 (and 1 without mixture weights), got {num_mixtures}")
        self.num_mixtures, self.weighted = num_mixtures, weighted
        self.params_per_channel = 3 * num_mixtures if weighted else 2

    # -- the standard component (standardised units) ------------------------------------------------

    def _log_cdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_sf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_mass(self, c: Tensor, h: Tensor) -> Tensor:
        """log(CDF(c + h) - CDF(c - h)), h > 0."""
        raise NotImplementedError

    def _standard_sample(self, shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------------

    def _split(self, params: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """params [B, C*P, ...] -> (logits | None, means, log_scales), each [B, C, M, ...]."""
        p = self.params_per_channel
        if params.dim() < 2 or params.shape[1] % p:
            raise ValueError(f"params must be [B, C*{p}, ...] (params_per_channel = {p}), got {tuple(params.shape)}")
        # bf16 (autocast) cannot resolve 2/256-wide bins near +-1 nor small log-probabilities: compute in float32+.
        params = params.to(torch.promote_types(params.dtype, torch.float32))
        params = params.unflatten(1, (params.shape[1] // p, p))  # [B, C, P, ...]
        m = self.num_mixtures
        if not self.weighted:
            return None, params[:, :, 0:1], params[:, :, 1:2].clamp_min(MIN_LOG_SCALE)
        return params[:, :, :m], params[:, :, m:2 * m], params[:, :, 2 * m:].clamp_min(MIN_LOG_SCALE)

    def _log_prob_at(self, params: Tensor, x: Tensor, k: Tensor, trailing: bool) -> Tensor:
        """log p(bin k) with centre x; trailing=True puts the bins in a new last dim (x, k of shape [256])."""
        logits, means, log_scales = self._split(params)
        if trailing:
            logits = None if logits is None else logits.unsqueeze(-1)
            means, log_scales = means.unsqueeze(-1), log_scales.unsqueeze(-1)
        inv_scale = torch.exp(-log_scales)
        c, h = (x - means) * inv_scale, HALF_BIN * inv_scale  # bin centre and half-width in standard units
        # Every branch is finite everywhere, so torch.where passes finite gradients whichever branch is taken.
        lp = self._log_mass(c, h)
        lp = torch.where(k == 0, self._log_cdf(c + h), lp)  # bin 0 covers (-inf, x_0 + 1/256]
        lp = torch.where(k == NUM_BINS - 1, self._log_sf(c - h), lp)  # bin 255 covers [x_255 - 1/256, inf)
        if logits is None:
            return lp.squeeze(2)
        return torch.logsumexp(F.log_softmax(logits, dim=2) + lp, dim=2)

    def log_probs(self, params: Tensor) -> Tensor:
        """Log-probability of every 8-bit value: [B, C*P, H, W] -> [B, C, H, W, 256]; logsumexp over 256 is 0.

        Materialises 256 values per pixel and component; meant for tests, sampling checks and small images.
        """
        k = torch.arange(NUM_BINS, device=params.device)
        x = bin_centres(params.device, torch.promote_types(params.dtype, torch.float32))
        return self._log_prob_at(params, x, k, trailing=True)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        """-log p(x | params) in nats per example, [B], summed over C, H, W; x [B, C, H, W] on the bin centres."""
        x = x.to(torch.promote_types(params.dtype, torch.float32))
        if x.shape[1] * self.params_per_channel != params.shape[1] or x.shape[2:] != params.shape[2:]:
            raise ValueError(f"params {tuple(params.shape)} do not match x {tuple(x.shape)} with "
                             f"{self.params_per_channel} params per channel")
        xm = x.unsqueeze(2)  # [B, C, 1, H, W] broadcasts over the components
        return -_sum_per_example(self._log_prob_at(params, xm, bin_index(xm), trailing=False))

    def mean(self, params: Tensor, max_elements: int = 2**24) -> Tensor:
        """The expected pixel value sum_k p_k x_k, [B, C, H, W] in [-1, 1]: the decoded image.

        Summation by parts needs only the CDF at the 255 inner bin edges e_k = x_k + 1/256:
        E[x] = x_255 - (2/256) sum_k CDF(e_k), one CDF per edge instead of a probability mass per bin.
        Computed in chunks of the batch, at most max_elements edge evaluations at a time.
        """
        per_example = params[0].numel() // self.params_per_channel * NUM_BINS * self.num_mixtures
        chunk = max(1, max_elements // max(1, per_example))
        dtype = torch.promote_types(params.dtype, torch.float32)
        centres = bin_centres(params.device, dtype)
        edges = centres[:-1] + HALF_BIN
        out = []
        for p in params.split(chunk):
            logits, means, log_scales = self._split(p)  # [b, C, M, H, W]
            cdf = torch.exp(self._log_cdf((edges - means.unsqueeze(-1)) * torch.exp(-log_scales).unsqueeze(-1)))
            cdf_sum = cdf.sum(-1)  # [b, C, M, H, W]
            cdf_sum = cdf_sum.squeeze(2) if logits is None else (torch.softmax(logits, dim=2) * cdf_sum).sum(2)
            out.append(centres[-1] - 2 * HALF_BIN * cdf_sum)
        return torch.cat(out)

    def location(self, params: Tensor) -> Tensor:
        """A cheap point estimate, [B, C, H, W]: the mixture-weighted component locations clamped to
        [-1, 1] (not the exact mean, which needs all 256 values; for monitoring during training)."""
        logits, means, _ = self._split(params)
        loc = means.clamp(-1, 1)
        return (loc.squeeze(2) if logits is None else (torch.softmax(logits, dim=2) * loc).sum(2)).to(params.dtype)

    @torch.no_grad()
    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x ~ p(x | params), [B, C, H, W] on the bin centres.

        Exact up to the resolution of the uniform draws: draw a component (Gumbel-max over the logits),
        draw a continuous value from it, then take the bin it falls in (the edge bins absorb the tails).
        """
        logits, means, log_scales = self._split(params)
        if logits is None:
            mean, log_scale = means.squeeze(2), log_scales.squeeze(2)
        else:
            u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            gumbel = -torch.log(-torch.log(u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)))
            pick = (logits + gumbel).argmax(2, keepdim=True)  # [B, C, 1, H, W]
            mean, log_scale = means.gather(2, pick).squeeze(2), log_scales.gather(2, pick).squeeze(2)
        y = mean + log_scale.exp() * self._standard_sample(mean.shape, generator, mean)
        k = ((y + 1) * (NUM_BINS / 2)).floor().clamp(0, NUM_BINS - 1)  # bin k is [-1 + 2k/256, -1 + 2(k+1)/256)
        return (2 * k + 1) / NUM_BINS - 1


class DiscretizedLogisticMixture(DiscretizedLikelihood):
    """PixelCNN++'s discretized mixture of logistics, M components per channel, channels independent.

    P = 3M parameters per channel: mixture logits, means (unconstrained), log-scales (clamped >= -7).
    """

    def __init__(self, num_mixtures: int = 10) -> None:
        super().__init__(num_mixtures, weighted=True)

    def _log_cdf(self, u: Tensor) -> Tensor:
        return F.logsigmoid(u)

    def _log_sf(self, u: Tensor) -> Tensor:
        return F.logsigmoid(-u)

    def _log_mass(self, c: Tensor, h: Tensor) -> Tensor:
        # sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a - b)) exactly, so with a, b = c -+ h:
        # three log terms, none of which underflows in the tails or cancels for wide scales. This makes
        # PixelCNN++'s fallback to log pdf + log bin width (for a difference of sigmoids that underflows) unnecessary.
        return F.logsigmoid(c + h) + F.logsigmoid(h - c) + _log1mexp(2 * h)

    def _standard_sample(self, shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
        u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
        return torch.logit(u, eps=torch.finfo(u.dtype).eps)  # inverse CDF of the standard logistic


class DiscretizedLogistic(DiscretizedLogisticMixture):
    """A single discretized logistic per channel: P = 2 parameters (mean, log-scale)."""

    def __init__(self) -> None:
        DiscretizedLikelihood.__init__(self, 1, weighted=False)


class DiscretizedGaussian(DiscretizedLikelihood):
    """A discretized Gaussian per channel: P = 2 parameters (mean, log standard deviation)."""

    def __init__(self) -> None:
        super().__init__(1, weighted=False)

    def _log_cdf(self, u: Tensor) -> Tensor:
        return _log_ndtr(u)

    def _log_sf(self, u: Tensor) -> Tensor:
        return _log_ndtr(-u)

    def _log_mass(self, c: Tensor, h: Tensor) -> Tensor:
        # Reflect the bin to the lower tail (the mass is symmetric in c), where log Phi keeps relative precision:
        # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - Phi(a)/Phi(b)). Exact and underflow-free far in the tails.
        t = -c.abs()
        hi, lo = _log_ndtr(t + h), _log_ndtr(t - h)
        exact = hi + _log1mexp(hi - lo)
        # When the bin is narrow against the scale, hi - lo is a small difference of rounded numbers; there
        # the midpoint rule with its curvature corrections is accurate instead (next term ~ (h max(1,|c|))^6 / 5040):
        # int_{c-h}^{c+h} phi = 2h phi(c) [1 + h^2 (c^2 - 1)/6 + h^4 (c^4 - 6c^2 + 3)/120 + ...].
        narrow = h * c.abs().clamp_min(1.0) < 0.1
        cn, hn = torch.where(narrow, c, 0.0), torch.where(narrow, h, 0.0)  # keeps the unused branch finite
        c2, h2 = cn.square(), hn.square()
        corr = h2 * (c2 - 1) / 6 + h2.square() * (c2.square() - 6 * c2 + 3) / 120
        midpoint = -0.5 * c2 - _HALF_LOG_2PI + torch.log(2 * h) + torch.log1p(corr)
        return torch.where(narrow, midpoint, exact)

    def _standard_sample(self, shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


_KINDS = {
    "logistic_mixture": lambda m: DiscretizedLogisticMixture(m),
    "logistic": lambda m: DiscretizedLogistic(),
    "gaussian": lambda m: DiscretizedGaussian(),
}


def build_likelihood(kind: str, num_mixtures: int = 10) -> DiscretizedLikelihood:
    """The decoder likelihood by name: "logistic_mixture" (uses num_mixtures), "logistic" or "gaussian"."""
    if kind not in _KINDS:
        raise ValueError(f"unknown likelihood kind {kind!r}; expected one of {', '.join(map(repr, _KINDS))}")
    return _KINDS[kind](num_mixtures)
