"""Test-set NELBO in bits/dim, per term and in total, with its Monte-Carlo standard error."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .codec import PixelCodec
from .ndm import NDM
from .process import bits_per_dim


@torch.no_grad()
def evaluate_nelbo(
    ndm: NDM,
    images: Tensor,
    codec: PixelCodec,
    num_steps: int | None = None,
    batch_size: int = 250,
    repeats: int = 1,
    seed: int = 1234,
    progress: bool = False,
) -> dict[str, float]:
    """Mean NELBO over `images` (uint8 [N, C, H, W]) in bits per dimension of the images.

    num_steps: T of the discrete bound, 0 for continuous time, None for the model's own.
    Each image gets `repeats` independent draws of (t, eps); the standard error is over images.
    """
    was_training = ndm.training
    ndm.eval()
    device = ndm.device
    generator = torch.Generator(device).manual_seed(seed)
    dims = images[0].numel()
    per_image = {k: torch.zeros(len(images), dtype=torch.float64) for k in ("rec", "diff", "prior")}
    chunks = range(0, len(images), batch_size)
    for start in tqdm(chunks, desc="nelbo", disable=not progress, leave=False):
        x = codec.encode(images[start : start + batch_size].to(device))
        for _ in range(repeats):
            terms = ndm.nelbo(x, generator, num_steps)
            for k, v in terms.items():
                per_image[k][start : start + len(x)] += v.cpu() / repeats
    ndm.train(was_training)
    total = sum(per_image.values())
    out = {f"{k}_bpd": bits_per_dim(v, dims).mean().item() for k, v in per_image.items()}
    out["bpd"] = bits_per_dim(total, dims).mean().item()
    out["bpd_stderr"] = bits_per_dim(total, dims).std().item() / math.sqrt(len(images))
    out["num_steps"] = ndm.num_steps if num_steps is None else num_steps
    out["num_images"] = len(images)
    return out
