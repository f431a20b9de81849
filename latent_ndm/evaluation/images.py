"""Writing image grids and sample files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] tile image."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"make_grid expects uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = arr[k]
    return grid


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    grid = make_grid(images, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def save_samples(images: Tensor, out_dir: str | Path, sampler: str, steps: int | None, seed: int,
                 temperature: float = 1.0, guidance: float | None = None, **meta) -> dict[str, str]:
    """Samples as a PNG grid and an .npz (images, sampler, steps, seed, temperature, the guidance weight and
    `meta`, e.g. the NFE), both named {sampler}_steps{steps}_seed{seed}, with _temp{temperature} when it is not 1
    and _guide{guidance} when the samples were guided (guidance not None); returns their paths."""
    out_dir = Path(out_dir)
    stem = f"{sampler}_steps{steps or 'default'}_seed{seed}" + (f"_temp{temperature:g}" if temperature != 1 else "")
    stem += f"_guide{guidance:g}" if guidance is not None else ""
    png = save_grid(images, out_dir / f"{stem}.png")
    np.savez_compressed(out_dir / f"{stem}.npz", images=images.cpu().numpy(), sampler=sampler, seed=seed,
                        steps=steps or 0, temperature=temperature, guidance=np.nan if guidance is None else guidance,
                        **meta)
    return {"png": str(png), "npz": str(out_dir / f"{stem}.npz")}
