"""What F does to the data, as numbers: statistics of F(x, t) over a test set as t grows.

NDM's claim is that the learned transformation makes the data easier to diffuse. These statistics
make the claim measurable and comparable with the baseline, whose F(x, t) = x gives the data's own
figures at every t (docs/MATH.md, section 13):

- `rms_ratio`: the spread of F(x, t) over the set against that of x (sqrt of the ratio of the traces
  of their covariances): F shrinking or stretching the data.
- `effective_dim`: how many principal components hold `share` (95%) of the variance of F(x, t).
- `wiener_mse_equal_snr`: the error of the best linear denoiser (the Wiener filter of a Gaussian with
  F(x, t)'s mean and covariance) in white noise, as a share of F(x, t)'s variance, at the signal-to-noise
  power ratio the data itself has at t (trace(Cov x) alpha_t^2 / (D sigma_t^2)). Scaling F does not
  change it: it measures only how concentrated F(x, t)'s spectrum is, i.e. how much a denoiser can
  recover at equal SNR. 1 - share = the share of variance the noise leaves recoverable.
- `wiener_mse_process`: the same filter's error per dimension at the process's own noise: z_t = alpha_t
  F(x, t) + sigma_t eps, in the units of x. This is what the diffusion at t actually faces, scale included.
- `ink` and `contrast` (pixel models; values in [-1, 1] units): the share of pixels above mid-grey (stroke
  area on a dark background, i.e. thickness for MNIST) and the mean over images of the pixels' standard
  deviation within an image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latent_ndm.core import process as P
from latent_ndm.core.model import ImageModel

TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


def wiener_mse(eigenvalues: Tensor, noise_var: float) -> float:
    """Mean squared error per dimension of the best linear estimate of y from y + n, n ~ N(0, noise_var I),
    for y with covariance eigenvalues `eigenvalues`: (1/D) sum_i l_i s / (l_i + s)."""
    lam = eigenvalues.clamp_min(0).double()
    return float((lam * noise_var / (lam + noise_var)).sum() / len(lam))


def effective_dimension(eigenvalues: Tensor, share: float = 0.95) -> int:
    """The fewest principal components whose variance is at least `share` of the total."""
    lam = eigenvalues.clamp_min(0).double().sort(descending=True).values
    cum = lam.cumsum(0) / lam.sum()
    return int((cum < share - 1e-12).sum()) + 1


def covariance_eigenvalues(y: Tensor) -> Tensor:
    """Eigenvalues of the sample covariance (divisor N - 1) of the rows of y [N, D], float64, from its singular
    values: the same as eigvalsh of the D x D covariance, without forming it when N < D."""
    yc = y.double() - y.double().mean(0, keepdim=True)
    s = torch.linalg.svdvals(yc)
    lam = s**2 / max(len(y) - 1, 1)
    return torch.cat([lam, lam.new_zeros(max(y.shape[1] - len(lam), 0))])


def spectrum_statistics(y: Tensor, x_total_var: float, noise_over_signal: float, share: float = 0.95) -> dict:
    """The statistics of module docstring for the rows y [N, D] at one t, given trace(Cov x) and sigma_t^2/alpha_t^2."""
    lam = covariance_eigenvalues(y)
    total = float(lam.sum())
    dims = y.shape[1]
    # Equal SNR: noise variance per dimension such that trace(Cov y) / (D s) = trace(Cov x) / (D s_t).
    equal_snr_noise = noise_over_signal * total / x_total_var
    return {"rms_ratio": (total / x_total_var) ** 0.5,
            "effective_dim": effective_dimension(lam, share),
            "wiener_mse_equal_snr": wiener_mse(lam, equal_snr_noise) * dims / total if total > 0 else 0.0,
            "wiener_mse_process": wiener_mse(lam, noise_over_signal)}


@torch.no_grad()
def transform_statistics(model: ImageModel, images: Tensor, times: tuple[float, ...] = TIMES,
                         share: float = 0.95, batch_size: int = 250) -> dict[str, dict[str, float]]:
    """Statistics of F(x, t) over uint8 `images` at each t (keys 't=0.25', ...), x their deterministic encoding.

    Every t uses the same images; for F = identity every row is that of x."""
    model.eval()
    x = torch.cat([model.codec.encode_mean(images[i : i + batch_size].to(model.device)).double()
                   for i in range(0, len(images), batch_size)])
    x_total_var = float(covariance_eigenvalues(x.flatten(1)).sum())
    out: dict[str, dict[str, float]] = {}
    for t in times:
        tt = torch.full((len(x),), t, dtype=torch.float64, device=x.device)
        y = torch.cat([model.ndm.transform_many([(x[i : i + batch_size].float(), tt[i : i + batch_size])])[0]
                       for i in range(0, len(x), batch_size)]).double()
        alpha, sigma = P.alpha_sigma(model.ndm.gamma(tt[:1]))
        noise_over_signal = float((sigma / alpha) ** 2)
        flat = y.flatten(1)
        stats = spectrum_statistics(flat, x_total_var, noise_over_signal, share)
        stats |= {"ink": float((flat > 0).double().mean()), "contrast": float(flat.std(dim=1).mean()),
                  "noise_over_signal": noise_over_signal}
        out[f"t={t:g}"] = stats
    return out
