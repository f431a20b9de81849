"""The pictures people look at: what F does to data over time, and denoising trajectories."""

from __future__ import annotations

import torch
from torch import Tensor

from latent_ndm.core.codec import PixelCodec
from latent_ndm.core.ndm import NDM
from latent_ndm.sampling.samplers import get_sampler

TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def transform_rows(ndm: NDM, images: Tensor, times: tuple[float, ...] = TIMES) -> tuple[Tensor, Tensor, float]:
    """For each image (a row), F(x, t) at each t (columns): (F clipped to [-1, 1], (F - x) / scale with
    mid-grey = 0, scale = max |F - x|), both uint8 [N * len(times), C, H, W].

    NDM's central picture: F(x, 0) = x, and what the learned transformation makes of x on the way to
    t = 1 is what the diffusion then adds noise to. For F = identity every row repeats x (and the
    difference picture is uniformly grey).
    """
    codec = PixelCodec()
    x = codec.encode(images.to(ndm.device))
    cols = [ndm.transform_many([(x, torch.full((len(x),), t, dtype=torch.float64, device=x.device))])[0]
            for t in times]
    grid = torch.stack(cols, dim=1)  # [N, T, C, H, W]
    diff = grid - x[:, None]
    scale = float(diff.abs().max().clamp_min(1e-12))
    return codec.decode(grid.flatten(0, 1).clamp(-1, 1)), codec.decode((diff / scale).flatten(0, 1)), scale


@torch.no_grad()
def trajectory_rows(ndm: NDM, n: int, steps: int, columns: int = 8, sampler: str = "ancestral",
                    generator: torch.Generator | None = None) -> Tensor:
    """uint8 [n * columns, C, H, W]: each row one sample's prediction xhat at evenly spaced steps,
    from t = 1 (left) to the final sample (right)."""
    keep = {round(k * steps / (columns - 1)) for k in range(1, columns)} | {1}
    frames: list[Tensor] = []

    def record(k: int, total: int, z: Tensor, xhat: Tensor) -> None:
        if k in keep:
            frames.append(xhat.clamp(-1, 1))

    res = get_sampler(sampler)(ndm, (n, *ndm.data_shape), generator, steps, record)
    frames = frames[: columns - 1] + [res.x]
    grid = torch.stack(frames, dim=1)  # [n, columns, C, H, W]
    return PixelCodec().decode(grid.flatten(0, 1))
