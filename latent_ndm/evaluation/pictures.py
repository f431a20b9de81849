"""The pictures people look at: what F does to data over time, and denoising trajectories.

Both work for pixel and latent models alike: F acts in the model's space and every frame is shown
through the codec (a latent model's frames are decoded images).
"""

from __future__ import annotations

import torch
from torch import Tensor

from latent_ndm.core.codec import model_to_pixels, pixels_to_model
from latent_ndm.core.model import ImageModel
from latent_ndm.sampling.samplers import get_sampler

TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def transform_rows(model: ImageModel, images: Tensor, times: tuple[float, ...] = TIMES
                   ) -> tuple[Tensor, Tensor, float]:
    """For each image (a row), F(x, t) at each t (columns), x its deterministic encoding: (the frames as
    images, their difference from the image of F(x, 0) = x divided by scale with mid-grey = 0, scale = the
    largest |difference| in [-1, 1] pixel units), both uint8 [N * len(times), C, H, W].

    NDM's central picture: what the learned transformation makes of x on the way to t = 1 is what the
    diffusion then adds noise to. For F = identity every row repeats x (and the difference is grey).
    """
    x = model.codec.encode_mean(images.to(model.device))
    cols = [model.ndm.transform_many([(x, torch.full((len(x),), t, dtype=torch.float64, device=x.device))])[0]
            for t in times]
    frames = model.codec.decode(torch.stack(cols, dim=1).flatten(0, 1))  # [N * T, C, H, W]
    pixels = pixels_to_model(frames).unflatten(0, (len(x), len(times)))
    diff = pixels - pixels[:, :1]
    scale = float(diff.abs().max().clamp_min(1e-12))
    return frames.cpu(), model_to_pixels((diff / scale).flatten(0, 1)).cpu(), scale


@torch.no_grad()
def trajectory_rows(model: ImageModel, n: int, steps: int, columns: int = 8, sampler: str = "ancestral",
                    generator: torch.Generator | None = None) -> Tensor:
    """uint8 [n * columns, C, H, W]: each row one sample's prediction xhat at evenly spaced steps,
    from t = 1 (left) to the final sample (right), shown through the codec."""
    keep = {round(k * steps / (columns - 1)) for k in range(1, columns)} | {1}
    frames: list[Tensor] = []

    def record(k: int, total: int, z: Tensor, xhat: Tensor) -> None:
        if k in keep:
            frames.append(xhat)

    res = get_sampler(sampler)(model.ndm, (n, *model.ndm.data_shape), generator, steps, record)
    frames = frames[: columns - 1] + [res.x]
    grid = torch.stack(frames, dim=1)  # [n, columns, ...] in model space
    return model.codec.decode(grid.flatten(0, 1)).cpu()
