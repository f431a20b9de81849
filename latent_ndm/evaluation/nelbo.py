"""Test-set NELBO in bits/dim, per term and in total, with its Monte-Carlo standard error.

Each example's noise is keyed by (seed, repeat, example id), so the figure does not depend on the
batching or on how many processes share the test set; with `distributed=True` every process
evaluates its share and the per-example terms are gathered, each example counted exactly once.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from latent_ndm.core.codec import PixelCodec
from latent_ndm.core.ndm import NDM
from latent_ndm.core.noise import Noise
from latent_ndm.core.process import bits_per_dim

TERMS = ("rec", "diff", "prior")


@torch.no_grad()
def nelbo_per_example(ndm: NDM, images: Tensor, ids: Tensor, codec: PixelCodec, num_steps: int | None = None,
                      batch_size: int = 250, repeats: int = 1, seed: int = 1234,
                      progress: bool = False) -> dict[str, Tensor]:
    """{'rec', 'diff', 'prior'}: float64 [N] nats per example, each the mean of `repeats` draws."""
    was_training = ndm.training
    ndm.eval()
    device = ndm.device
    per_image = {k: torch.zeros(len(images), dtype=torch.float64) for k in TERMS}
    chunks = range(0, len(images), batch_size)
    for start in tqdm(chunks, desc="nelbo", disable=not progress, leave=False):
        x = codec.encode(images[start : start + batch_size].to(device))
        for r in range(repeats):
            noise = Noise.per_example(ids[start : start + len(x)].tolist(), device, seed, "nelbo", r)
            for k, v in ndm.nelbo(x, noise, num_steps).items():
                per_image[k][start : start + len(x)] += v.cpu() / repeats
    ndm.train(was_training)
    return per_image


def gather_examples(ids: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Every process's (ids, per-example terms), concatenated and sorted by id; an id held by two
    processes is an error (each example must count once)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (ids.cpu(), {k: v.cpu() for k, v in terms.items()}))
        ids = torch.cat([p[0] for p in parts])
        terms = {k: torch.cat([p[1][k] for p in parts]) for k in terms}
    if len(torch.unique(ids)) != len(ids):
        raise RuntimeError("an example was evaluated by more than one process")
    order = torch.argsort(ids)
    return ids[order], {k: v[order] for k, v in terms.items()}


def evaluate_nelbo(
    ndm: NDM,
    images: Tensor,
    codec: PixelCodec,
    num_steps: int | None = None,
    batch_size: int = 250,
    repeats: int = 1,
    seed: int = 1234,
    progress: bool = False,
    ids: Tensor | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Mean NELBO over `images` (uint8 [N, C, H, W]) in bits per dimension of the images.

    num_steps: T of the discrete bound, 0 for continuous time, None for the model's own.
    Each image gets `repeats` independent draws of (t, eps); the standard error is over images.
    ids: the images' indices in their split (default 0..N-1), which key their noise.
    distributed: every process passes its share and all get the result over the union.
    """
    ids = torch.arange(len(images)) if ids is None else ids
    dims = images[0].numel() if len(images) else math.prod(ndm.data_shape)
    per_image = nelbo_per_example(ndm, images, ids, codec, num_steps, batch_size, repeats, seed, progress)
    if distributed:
        ids, per_image = gather_examples(ids, per_image)
    if len(ids) == 0:
        raise ValueError("no test images to evaluate")
    total = sum(per_image.values())
    out = {f"{k}_bpd": bits_per_dim(v, dims).mean().item() for k, v in per_image.items()}
    out["bpd"] = bits_per_dim(total, dims).mean().item()
    out["bpd_stderr"] = bits_per_dim(total, dims).std().item() / math.sqrt(len(total))
    out["num_steps"] = ndm.num_steps if num_steps is None else num_steps
    out["num_images"] = len(total)
    return out
