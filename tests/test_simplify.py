"""What F does, as numbers (latent_ndm.evaluation.simplify): the Wiener error against a Monte-Carlo linear
denoiser, the effective dimension and covariance spectrum against closed forms, and the statistics of a
scaling F against those of the data, which they must equal or scale exactly."""

from __future__ import annotations

import pytest
import torch

from latent_ndm.config import load_config
from latent_ndm.core import process as P
from latent_ndm.core.transforms import Transform
from latent_ndm.evaluation.simplify import (
    covariance_eigenvalues,
    effective_dimension,
    spectrum_statistics,
    transform_statistics,
    wiener_mse,
)
from latent_ndm.tasks.pixel import build_pixel_model


def test_wiener_mse_is_the_error_of_the_best_linear_denoiser() -> None:
    """Closed form (eigenvalues) against the matrix Wiener filter applied to Gaussian samples."""
    g = torch.Generator().manual_seed(0)
    d, n, s = 6, 400_000, 0.3
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    cov = q @ torch.diag(lam) @ q.T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    noisy = y + s**0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    filt = cov @ torch.linalg.inv(cov + s * torch.eye(d, dtype=torch.float64))
    mc = ((noisy @ filt.T - y) ** 2).mean().item()
    assert wiener_mse(lam, s) == pytest.approx(mc, rel=5e-3)
    # Limits: no noise, no error; infinite noise, the signal's whole variance.
    assert wiener_mse(lam, 0.0) == 0.0 and wiener_mse(lam, 1e12) == pytest.approx(lam.mean().item(), rel=1e-9)


def test_effective_dimension_and_the_covariance_spectrum() -> None:
    lam = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])  # cumulative shares 0.5, 0.8, 0.9, 0.95, 1
    assert effective_dimension(lam, 0.95) == 4 and effective_dimension(lam, 0.9) == 3
    assert effective_dimension(lam, 0.5) == 1 and effective_dimension(lam, 1.0) == 5
    g = torch.Generator().manual_seed(1)
    for n, d in ((50, 8), (5, 8)):  # more rows than columns, and fewer (zeros fill the spectrum)
        y = torch.randn(n, d, generator=g, dtype=torch.float64)
        ref = torch.linalg.eigvalsh(torch.cov(y.T)).flip(0)
        assert torch.allclose(covariance_eigenvalues(y), ref.clamp_min(0), atol=1e-10)
    rank3 = torch.randn(40, 3, generator=g) @ torch.randn(3, 10, generator=g)
    assert effective_dimension(covariance_eigenvalues(rank3), 0.999999) == 3


class Scale(Transform):
    """F(x, t) = (1 + t) x."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * (1 + t.to(x.dtype)).view(-1, *[1] * (x.dim() - 1))


def test_a_scaling_f_changes_only_the_scale_dependent_statistics() -> None:
    """F = (1 + t) x: the spread and contrast scale by 1 + t, the Wiener error at the process's noise is that of
    the scaled spectrum, and the scale-free figures (effective dimension, error at equal SNR, ink) are the data's."""
    cfg = load_config("configs/ddpm_mnist.yaml", ["data.image_size=8", "model.denoiser.size=tiny"])
    model = build_pixel_model(cfg)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 8, 8, generator=g) ** 3 * 255).to(torch.uint8)  # mostly dark, some bright
    data = transform_statistics(model, images)
    model.ndm.transform = Scale()
    scaled = transform_statistics(model, images)
    x = (images.double().flatten(1) + 0.5) / 128 - 1  # the codec's 8-bit bin centres in [-1, 1]
    lam = covariance_eigenvalues(x)
    for key, t in ((k, float(k[2:])) for k in data):
        a, b = data[key], scaled[key]
        alpha, sigma = P.alpha_sigma(model.ndm.gamma(torch.tensor([t], dtype=torch.float64)))
        s = float((sigma / alpha) ** 2)
        assert a["rms_ratio"] == pytest.approx(1.0, rel=1e-9) and b["rms_ratio"] == pytest.approx(1 + t, rel=1e-6)
        assert b["effective_dim"] == a["effective_dim"] == effective_dimension(lam)
        assert b["wiener_mse_equal_snr"] == pytest.approx(a["wiener_mse_equal_snr"], rel=1e-6)
        assert a["wiener_mse_process"] == pytest.approx(wiener_mse(lam, s), rel=1e-6)
        assert b["wiener_mse_process"] == pytest.approx(wiener_mse((1 + t) ** 2 * lam, s), rel=1e-6)
        assert b["ink"] == a["ink"] == pytest.approx((x > 0).double().mean().item())
        assert b["contrast"] == pytest.approx((1 + t) * a["contrast"], rel=1e-6)
        # At equal SNR the data's error share is its process error over its variance per dimension.
        assert a["wiener_mse_equal_snr"] == pytest.approx(a["wiener_mse_process"] * len(lam) / lam.sum().item(),
                                                          rel=1e-6)
    assert spectrum_statistics(x, lam.sum().item(), 0.1)["rms_ratio"] == pytest.approx(1.0)
