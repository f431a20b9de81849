"""Test-set bits/dim of any model (pixel or latent): the NELBO and the bound with the ODE NLL.

One per-example loop serves both: each example's noise is keyed by (seed, codec.noise_key, repeat,
example id), so a figure does not depend on the batching or on how many processes share the test set,
and the NELBO and the ODE variant of the same example use the same codec draw (the same z0 of a
latent model). With `distributed=True` every process evaluates its share and the per-example terms
are gathered, each example counted exactly once. Bits are per dimension of the images, D = C H W.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.model import ImageModel
from latent_ndm.core.noise import Noise
from latent_ndm.core.process import bits_per_dim
from latent_ndm.sampling.ode_nll import ode_nll

Terms = Callable[[Tensor, Noise], dict[str, Tensor]]  # (batch on the device, its noise) -> nats [B] per term


@torch.no_grad()
def per_example(model: ImageModel, images: Tensor, ids: Tensor, terms: Terms, seed: int, repeats: int = 1,
                batch_size: int = 250, desc: str = "nelbo", progress: bool = False) -> dict[str, Tensor]:
    """`terms` of every example, float64 [N] nats on the CPU, each the mean of `repeats` keyed draws."""
    was_training = model.training
    model.eval()
    per: dict[str, Tensor] = {}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        batch = images[start : start + batch_size].to(model.device)
        for r in range(repeats):
            noise = Noise.per_example(ids[start : start + len(batch)].tolist(), model.device, seed,
                                      model.codec.noise_key, r)
            for k, v in terms(batch, noise).items():
                per.setdefault(k, torch.zeros(len(images), dtype=torch.float64))[start : start + len(batch)] += \
                    v.detach().double().cpu() / repeats
    model.train(was_training)
    return per


def gather_examples(ids: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Every process's (ids, per-example terms), concatenated and sorted by id; an id held by two
    processes is an error (each example must count once)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (ids.cpu(), {k: v.cpu() for k, v in terms.items()}))
        ids = torch.cat([p[0] for p in parts])
        # A process with no examples (more processes than test images) has no terms at all.
        keys = list(dict.fromkeys(k for p in parts for k in p[1]))
        empty = torch.zeros(0, dtype=torch.float64)
        terms = {k: torch.cat([p[1].get(k, empty) for p in parts]) for k in keys}
    if len(torch.unique(ids)) != len(ids):
        raise RuntimeError("an example was evaluated by more than one process")
    order = torch.argsort(ids)
    return ids[order], {k: v[order] for k, v in terms.items()}


def summarize(per: dict[str, Tensor], dims: int) -> dict[str, float]:
    """Mean bits per image dimension of each term and of their sum, with the sum's standard error."""
    total = sum(per.values()) if per else None
    if total is None or len(total) == 0:
        raise ValueError("no test images to evaluate")
    out = {f"{k}_bpd": bits_per_dim(v, dims).mean().item() for k, v in per.items()}
    out["bpd"] = bits_per_dim(total, dims).mean().item()
    # The standard error over images (undefined for one image).
    out["bpd_stderr"] = bits_per_dim(total, dims).std().item() / math.sqrt(len(total)) if len(total) > 1 \
        else math.nan
    out["num_images"] = len(total)
    return out


def _ids(images: Tensor, ids: Tensor | None) -> Tensor:
    return torch.arange(len(images)) if ids is None else ids


def nelbo_per_example(model: ImageModel, images: Tensor, ids: Tensor | None = None, num_steps: int | None = None,
                      batch_size: int = 250, repeats: int = 1, seed: int = 1234,
                      progress: bool = False) -> dict[str, Tensor]:
    """The bound's terms of every image (uint8 [N, C, H, W]), float64 [N] nats."""
    loss = NDMLoss().eval()  # uniform t, the plain bound, input checks on
    return per_example(model, images, _ids(images, ids), lambda b, n: model.nelbo_terms(b, n, loss, num_steps),
                       seed, repeats, batch_size, "nelbo", progress)


def evaluate_nelbo(model: ImageModel, images: Tensor, ids: Tensor | None = None, num_steps: int | None = None,
                   batch_size: int = 250, repeats: int = 1, seed: int = 1234, distributed: bool = False,
                   progress: bool = False) -> dict[str, float]:
    """Mean NELBO over uint8 `images` in bits per image dimension, per term and in total, with its standard error.

    num_steps: T of the NDM's discrete bound, 0 for continuous time, None for the model's own. Each image gets
    `repeats` independent draws; ids (default 0..N-1, their indices in the split) key the draws.
    distributed: every process passes its share and all get the result over the union.
    """
    ids = _ids(images, ids)
    per = nelbo_per_example(model, images, ids, num_steps, batch_size, repeats, seed, progress)
    if distributed:
        ids, per = gather_examples(ids, per)
    out = summarize(per, math.prod(images.shape[1:]))
    if "decoder" in per:  # a latent model: also the prior's own NELBO of z0
        out["prior_nelbo_bpd"] = sum(out[f"{k}_bpd"] for k in ("rec", "diff", "prior"))
    return out | {"num_steps": model.ndm.num_steps if num_steps is None else num_steps}


def evaluate_ode_nll(model: ImageModel, images: Tensor, ids: Tensor | None = None, batch_size: int = 100,
                     probes: int = 1, probe_kind: str = "rademacher", seed: int = 1234, rtol: float = 1e-5,
                     atol: float = 1e-5, progress: bool = False, distributed: bool = False,
                     per_image: bool = False) -> dict:
    """The bound with the NDM's exact -log p by its probability-flow ODE in place of its NELBO, in bits per
    image dimension, with the NFE per batch and the time (docs/MATH.md, section 10); per_image adds every
    image's bits/dim ('per_image_bpd', in id order) for differences paired over images.

    Per example: the codec's terms (a latent model's -log p(x|z0) + log q(z0|x), exactly those of
    `evaluate_nelbo`'s first repeat for the same seed and ids) + 'ode_nll'. 8-bit data are dequantised
    uniformly within their bin (a keyed draw) and 'ode_nll' includes the D log 128 nats of the [0, 256) ->
    [-1, 1] scaling, i.e. 7 bits/dim. The Hutchinson probes are keyed draws too; the adaptive solver's steps
    are shared by a batch, so results depend on the batching only within the solver's tolerance."""
    if probe_kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe_kind must be 'rademacher' or 'gaussian', got {probe_kind!r}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    nfe: list[int] = []

    def terms(batch: Tensor, noise: Noise) -> dict[str, Tensor]:
        x, out = model.codec.encode(batch, noise)
        dequantize = model.ndm.likelihood.dequantize
        uniforms = noise.uniform_like(x) if dequantize else None
        eps = torch.stack([noise.normal(x) for _ in range(probes)])  # [K, B, ...]
        if probe_kind == "rademacher":
            eps = torch.where(eps < 0, -1.0, 1.0).to(x.dtype)
        nats, info = ode_nll(model.ndm, x, probe_vectors=eps, dequantize_uniforms=uniforms, rtol=rtol, atol=atol)
        nfe.append(info["nfe"])
        scaling = x[0].numel() * math.log(128) if dequantize else 0.0  # 7 bits/dim for 0..255 -> [-1, 1]
        return out | {"ode_nll": nats + scaling}

    t0 = time.perf_counter()
    ids = _ids(images, ids)
    per = per_example(model, images, ids, terms, seed, 1, batch_size, "ode nll", progress)
    seconds = time.perf_counter() - t0
    if distributed:  # distributed: as evaluate_nelbo; NFE and seconds are this process's
        ids, per = gather_examples(ids, per)
    out = summarize(per, math.prod(images.shape[1:]))
    if per_image:
        out["per_image_bpd"] = bits_per_dim(sum(per.values()), math.prod(images.shape[1:])).tolist()
    return out | {"nfe_mean": sum(nfe) / max(len(nfe), 1), "seconds": seconds,
                  "seconds_per_image": seconds / max(len(images), 1),
                  "probes": probes, "probe_kind": probe_kind, "rtol": rtol, "atol": atol}
