"""Images to webdataset tar shards (lossless PNG) with a JSON manifest, and reading them back.

`python -m latent_ndm.shards SOURCE OUT_DIR [options]` (scripts/make_shards.sh) writes
OUT_DIR/{train,test}-000000.tar ... and OUT_DIR/manifest.json (counts, shape, dtype, channels,
source, split, shard names). Reading decodes every sample to a uint8 tensor [C, H, W]. A sample
that does not decode or a damaged shard is skipped with a warning and counted (strict=True makes it
fatal); a sample of the wrong shape or channel count stops at once, naming the shard and the key.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from .data import ImageData
from .sources import BUILT_IN, convert, load_folder, load_npz, load_torchvision

MANIFEST = "manifest.json"


class ShardFormatError(ValueError):
    """A sample whose shape or channel count differs from the manifest: always fatal."""


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) as PNG bytes (lossless)."""
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(data: ImageData, out_dir: str | Path, split: str, maxcount: int = 2000,
                 progress: bool = False) -> dict:
    """Write one split as {split}-NNNNNN.tar shards; returns its manifest entry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{split}-*.tar"):
        old.unlink()
    pattern = str(out_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for i in tqdm(range(len(data)), desc=f"{split} shards", disable=not progress, leave=False):
            sink.write({"__key__": f"{split}_{i:08d}", "png": encode_png(data.images[i]), "cls": int(data.labels[i])})
    shards = sorted(p.name for p in out_dir.glob(f"{split}-*.tar"))
    # ShardWriter fills each shard to maxcount before starting the next; the counts let a reader place
    # any global sample index (e.g. to resume mid-stream) without opening a shard.
    counts = [min(maxcount, len(data) - k * maxcount) for k in range(len(shards))]
    c, h, w = data.images.shape[1:]
    return {"count": len(data), "shards": shards, "shard_counts": counts, "shape": [int(c), int(h), int(w)],
            "dtype": "uint8", "channels": int(c), "split": split}


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make shards first (scripts/make_shards.sh)")
    return json.loads(path.read_text())


def split_urls(root: str | Path, split: str) -> list[str]:
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise KeyError(f"{root} has no {split!r} split; it has {sorted(manifest['splits'])}")
    return [str(Path(root) / s) for s in manifest["splits"][split]["shards"]]


@dataclass
class ReadStats:
    """Counts of what reading skipped (reported in training metrics)."""

    skipped: int = 0
    messages: list[str] = field(default_factory=list)


def decode_sample(sample: dict, shape: tuple[int, int, int]) -> tuple[torch.Tensor, int, str]:
    """(uint8 image [C, H, W], label, key); a wrong shape raises ShardFormatError naming shard and key."""
    where = f"shard {sample.get('__url__', '?')}, key {sample.get('__key__', '?')}"
    with Image.open(io.BytesIO(sample["png"])) as im:
        arr = np.array(im)  # a writable copy: torch refuses to wrap read-only buffers
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if tuple(arr.shape) != tuple(shape):
        raise ShardFormatError(f"{where}: image is {list(arr.shape)} (C, H, W) but the manifest says {list(shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr)), int(sample["cls"]), sample["__key__"]


def iterate_split(root: str | Path, split: str, strict: bool = False,
                  stats: ReadStats | None = None) -> Iterator[tuple[torch.Tensor, int, str]]:
    """One deterministic pass over a split in shard order: (image, label, key) per sample."""
    manifest = load_manifest(root)
    shape = tuple(manifest["splits"][split]["shape"])
    stats = stats if stats is not None else ReadStats()

    def handler(exn: Exception) -> bool:
        if strict or isinstance(exn, ShardFormatError):
            raise exn
        stats.skipped += 1
        stats.messages.append(repr(exn))
        warnings.warn(f"skipping unreadable data: {exn!r}", stacklevel=2)
        return True

    ds = wds.WebDataset(split_urls(root, split), shardshuffle=False, handler=handler, empty_check=False)
    for sample in ds:
        try:
            yield decode_sample(sample, shape)
        except ShardFormatError:
            raise
        except Exception as exn:  # a PNG that does not decode
            handler(exn)


def read_split(root: str | Path, split: str, strict: bool = False, stats: ReadStats | None = None) -> ImageData:
    """A whole split in memory (for small data and tests)."""
    items = list(iterate_split(root, split, strict, stats))
    if not items:
        raise ValueError(f"no readable samples in the {split} split of {root}")
    return ImageData(torch.stack([x for x, _, _ in items]).numpy(), np.asarray([y for _, y, _ in items]))


def make_shards(source: str, out_dir: str | Path, *, root: str = "", channels: int | None = None,
                center_crop: int | None = None, resize: int | None = None, patch: int = 32,
                download: bool = False, maxcount: int = 2000, progress: bool = False) -> dict:
    """Write train and test shards of a source and the manifest; returns the manifest."""
    def load(split: str) -> ImageData:
        if source in BUILT_IN:
            return BUILT_IN[source](split) if source != "photo-patches" else BUILT_IN[source](split, patch)
        if source == "folder":
            return load_folder(root, split)
        if source == "npz":
            return load_npz(Path(root) / f"{split}.npz")
        if source in ("cifar10", "mnist"):
            return load_torchvision(source, root, split, download)
        choices = ", ".join([*BUILT_IN, "folder", "npz", "cifar10", "mnist"])
        raise ValueError(f"unknown source {source!r}; choose from {choices}")

    manifest = {"source": source, "root": str(root), "splits": {},
                "options": {"channels": channels, "center_crop": center_crop, "resize": resize, "patch": patch}}
    for split in ("train", "test"):
        data = convert(load(split), channels, center_crop, resize)
        manifest["splits"][split] = write_shards(data, out_dir, split, maxcount, progress) | {"source": source}
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_shards.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="mnist5k | digits | photo-patches | folder | npz | cifar10 | mnist")
    p.add_argument("out_dir")
    p.add_argument("--root", default="", help="folder (folder: images; npz: train.npz/test.npz; torchvision)")
    p.add_argument("--channels", type=int, default=None, help="convert to 1 or 3 channels")
    p.add_argument("--center-crop", type=int, default=None)
    p.add_argument("--resize", type=int, default=None)
    p.add_argument("--patch", type=int, default=32, help="photo-patches: patch size")
    p.add_argument("--download", action="store_true", help="torchvision sources: download if missing")
    p.add_argument("--maxcount", type=int, default=2000, help="samples per shard")
    args = p.parse_args(argv)
    try:
        manifest = make_shards(args.source, args.out_dir, root=args.root, channels=args.channels,
                               center_crop=args.center_crop, resize=args.resize, patch=args.patch,
                               download=args.download, maxcount=args.maxcount, progress=True)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: {kk: v[kk] for kk in ("count", "shape", "shards")} for k, v in manifest["splits"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
