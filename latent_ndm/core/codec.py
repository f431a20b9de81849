"""The codec: the one boundary between stored images (uint8) and the space the NDM models.

Pixel models see 8-bit values on the bin centres -1 + (2k + 1)/256 in [-1, 1], the points at which
the discrete decoder p(x | z_0) puts its 256 bins. A latent codec (images <-> VAE latents) will
implement the same two methods; nothing else in the training loop or samplers depends on which.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latent_ndm.core.process import bin_centres, to_bin_index


class PixelCodec:
    """uint8 pixels [B, C, H, W] <-> model space on the 8-bit bin centres in [-1, 1]."""

    likelihood = "discrete8bit"

    def encode(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"PixelCodec.encode expects uint8 images, got {images.dtype}")
        return bin_centres(images.device)[images.long()]

    def decode(self, x: Tensor) -> Tensor:
        return to_bin_index(x.float().clamp(-1, 1)).to(torch.uint8)
