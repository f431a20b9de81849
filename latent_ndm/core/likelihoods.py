"""The data likelihood p(x | z_0) of the NDM's bound, one object per kind (docs/MATH.md, section 5).

- `Discrete8bit`: 8-bit data on the bin centres of [-1, 1], a factorised softmax over the 256 values
  per dimension (VDM's exact discrete decoder: no dequantisation in the bound);
- `Gaussian`: continuous data (VAE latents), p(x | z_0) = N(x; z_0/alpha_0, sigma_0^2/alpha_0^2 I).

Each gives -log p(x | z_0) per example in nats, the most likely x given z_0, a check of the data
range, and whether the probability-flow NLL must dequantise the data.
"""

from __future__ import annotations

from torch import Tensor

from latent_ndm.core import process as P


class Discrete8bit:
    name = "discrete8bit"
    dequantize = True  # the ODE's density is of continuous data: 8-bit values are dequantised first

    def nll(self, x: Tensor, z_0: Tensor, gamma_0: Tensor) -> Tensor:
        return P.reconstruction_nll_discrete(x, z_0, gamma_0)

    def most_likely(self, z_0: Tensor, alpha_0: Tensor) -> Tensor:
        """The nearest bin centre of z_0 / alpha_0."""
        x = (z_0 / P.expand(alpha_0, z_0)).clamp(-1, 1)
        return P.bin_centres(x.device, x.dtype)[P.to_bin_index(x)]

    def check(self, x: Tensor) -> None:
        # Catches uint8 pixels scaled to [0, 255] or [0, 1] floats at the API boundary; one reduction
        # and a host sync, so it is called on user input, not on every training step.
        lo, hi = (v.item() for v in x.detach().aminmax())
        if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(f"pixels in model space lie in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}] "
                             "(PixelCodec.encode maps uint8 images there)")


class Gaussian:
    name = "gaussian"
    dequantize = False

    def nll(self, x: Tensor, z_0: Tensor, gamma_0: Tensor) -> Tensor:
        return P.reconstruction_nll_gaussian(x, z_0, gamma_0)

    def most_likely(self, z_0: Tensor, alpha_0: Tensor) -> Tensor:
        return z_0 / P.expand(alpha_0, z_0)

    def check(self, x: Tensor) -> None:
        pass  # any real value is valid data


LIKELIHOODS = {"discrete8bit": Discrete8bit, "gaussian": Gaussian}
Likelihood = Discrete8bit | Gaussian


def get_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {name!r}")
    return LIKELIHOODS[name]()
