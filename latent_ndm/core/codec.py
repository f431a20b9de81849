"""Codecs: the one boundary between stored data and the space the NDM models (docs/MATH.md, section 11).

A codec maps a batch of stored data to the NDM's space and back, and reports the extra NELBO terms of
that map, so that pixel and latent models share one objective, one evaluator and one pipeline:
    encode(batch, noise) -> (x [B, ...] in model space, {name: per-example nats [B]})
    decode(x) -> uint8 images [B, C, H, W]
- `PixelCodec`: uint8 pixels <-> the 8-bit bin centres -1 + (2k + 1)/256 in [-1, 1]; no extra terms.
- `LatentCodec`: uint8 images -> one z0 ~ q(z0|x) of a VAE (normalised latents), with the terms
  'decoder' = -log p(x|z0) and 'log_q' = log q(z0|x) of LSGM's bound; decode is the decoder's mean image.
  Fed stored posterior parameters (float [B, 2c, h, w]: pre-encoded shards) instead of images, it draws
  z0 from them and reports 'log_q' only (the decoder's term needs the image).
The first draw of the noise is the codec's (z0), so the NDM's draws come after it in the same order
whatever the codec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from latent_ndm.core.noise import Noise
from latent_ndm.core.process import bin_centres, to_bin_index
from vae.distributions import DiagonalGaussian

if TYPE_CHECKING:
    from vae.model import VAE


def check_images(images: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """uint8 images [N, C, H, W] (of one image shape, when given), or a clear error."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, C, H, W], got {images.dtype}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"images must have shape [N, {', '.join(map(str, shape))}], got {tuple(images.shape)}")
    return images


def pixels_to_model(images: Tensor) -> Tensor:
    """uint8 pixels -> float32 on the 8-bit bin centres in [-1, 1]."""
    return bin_centres(images.device)[check_images(images).long()]


def model_to_pixels(x: Tensor) -> Tensor:
    """Floats in [-1, 1] -> uint8: the bin each value is nearest to the centre of."""
    return to_bin_index(x.float().clamp(-1, 1)).to(torch.uint8)


class PixelCodec(nn.Module):
    """uint8 pixels [B, C, H, W] <-> model space on the 8-bit bin centres in [-1, 1]."""

    likelihood = "discrete8bit"  # the NDM's p(x | z_0) in this space
    noise_key = "nelbo"  # evaluation keys each example's noise by (seed, noise_key, repeat, id)

    def encode(self, images: Tensor, noise: Noise | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return pixels_to_model(images), {}

    def encode_mean(self, images: Tensor) -> Tensor:
        """The deterministic encoding (here the only one)."""
        return pixels_to_model(images)

    def decode(self, x: Tensor) -> Tensor:
        return model_to_pixels(x)

    def model_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(image_shape)


class LatentCodec(nn.Module):
    """uint8 images <-> a VAE's normalised latents, with the VAE's terms of the bound.

    frozen: stage 2; the VAE gets no gradient and stays in eval mode (no dropout) whatever the mode
    of the model around it.
    """

    likelihood = "gaussian"
    noise_key = "joint"

    def __init__(self, vae: VAE, frozen: bool = False):
        super().__init__()
        if vae.likelihood is None:
            raise ValueError("a latent model needs a VAE with the discrete decoder (vae.decoder=discrete), so that "
                             "the whole model has a NELBO in bits/dim")
        self.vae = vae
        if frozen:
            self.vae.eval().requires_grad_(False)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vae.parameters())

    def train(self, mode: bool = True) -> LatentCodec:
        super().train(mode)
        if self.frozen:
            self.vae.eval()
        return self

    def encode(self, batch: Tensor, noise: Noise | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """One z0 ~ q(z0|x) per example (from `noise`'s first draw, or fresh draws) and its terms."""
        if batch.is_floating_point():  # stored posterior parameters [B, 2c, h, w] (pre-encoded shards)
            c = self.vae.config.latent_channels
            if batch.dim() != 4 or batch.shape[1] != 2 * c:
                raise TypeError(f"LatentCodec.encode expects uint8 images or stored posterior parameters float "
                                f"[B, {2 * c}, h, w], got {batch.dtype} {tuple(batch.shape)}")
            posterior, x = DiagonalGaussian(*batch.chunk(2, dim=1)), None
        else:
            x = self.vae.from_uint8(check_images(batch))
            posterior = self.vae.posterior(x)  # over normalised latents; x is valid by construction
        eps = noise.normal(posterior.mean) if noise is not None else torch.randn_like(posterior.mean)
        z0 = posterior.reparameterize(eps)
        if x is None:
            return z0, {"log_q": posterior.log_prob(z0)}
        # The decoder's term first: autograd sums z0's gradient contributions in the reverse order of their
        # creation, and this order keeps stage-3 runs bitwise equal to those of earlier versions.
        decoder = self.vae.likelihood.nll(self.vae.decoder_output(self.vae.denormalize(z0)), x)
        return z0, {"decoder": decoder, "log_q": posterior.log_prob(z0)}

    def decode(self, z0: Tensor) -> Tensor:
        return self.vae.to_uint8(self.vae.decode(z0))

    def encode_mean(self, images: Tensor) -> Tensor:
        """The deterministic encoding: the mean of q(z0|x) of uint8 images (normalised latents)."""
        return self.vae.encode(self.vae.from_uint8(check_images(images))).mean

    def model_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return self.vae.latent_shape(tuple(image_shape[1:]))


Codec = PixelCodec | LatentCodec
