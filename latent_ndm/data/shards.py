"""Images to webdataset tar shards (lossless PNG) with a JSON manifest, and reading them back.

`python -m latent_ndm.data.shards SOURCE OUT_DIR [options]` (scripts/make_shards.sh) writes
OUT_DIR/{train,test}-000000.tar ... and OUT_DIR/manifest.json (counts, shape, dtype, channels,
source, split, shard names, per-shard counts). Reading decodes every sample to a uint8 tensor
[C, H, W] (shards of pre-encoded latents, latent_ndm.data.latent_shards: a float32 array from an .npy
payload). A sample that does not decode or a damaged shard is skipped with a warning and counted
(strict=True makes it fatal); a sample of the wrong shape or channel count stops at once, naming the
shard and the key. The training stream and the evaluation pass built on this are in latent_ndm.data.streams.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from latent_ndm.data.sources import BUILT_IN, ImageData, convert, load_folder, load_npz, load_torchvision

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
                 shuffle_seed: int | None = None, progress: bool = False) -> dict:
    """Write one split as {split}-NNNNNN.tar shards; returns its manifest entry.

    shuffle_seed: write the samples in a seeded random order (for training data: a streaming reader
    then reads whole shards at a time and still sees every class in every shard). The key keeps the
    source index, {split}_NNNNNNNN, so any order maps back to the source.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{split}-*.tar"):
        old.unlink()
    order = np.arange(len(data)) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(len(data))
    pattern = str(out_dir / f"{split}-%06d.tar")
    # Plain ustar headers with an integer mtime: webdataset's default (pax headers for float times)
    # made reading three times slower, the header parsing costing more than decoding the PNGs.
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, format=tarfile.USTAR_FORMAT,
                         mtime=int(time.time())) as sink:
        for i in tqdm(order, desc=f"{split} shards", disable=not progress, leave=False):
            sink.write({"__key__": f"{split}_{i:08d}", "png": encode_png(data.images[i]), "cls": int(data.labels[i])})
    shards = sorted(p.name for p in out_dir.glob(f"{split}-*.tar"))
    # ShardWriter fills each shard to maxcount before starting the next; the counts let a reader place
    # any global sample index (e.g. to resume mid-stream) without opening a shard.
    counts = [min(maxcount, len(data) - k * maxcount) for k in range(len(shards))]
    c, h, w = data.images.shape[1:]
    return {"count": len(data), "shards": shards, "shard_counts": counts, "shape": [int(c), int(h), int(w)],
            "dtype": "uint8", "channels": int(c), "split": split, "shuffled": shuffle_seed is not None}


def load_manifest(location: str | Path) -> dict:
    """The manifest of a shard folder (or the path of a manifest file itself)."""
    path = Path(location)
    path = path if path.suffix == ".json" else path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make shards first, e.g. "
                                f"scripts/make_shards.sh mnist5k {path.parent}")
    return json.loads(path.read_text())


@dataclass
class SplitShards:
    """Where one split's shards are and what they hold: any URLs webdataset opens (paths, pipe:...)."""

    urls: list[str]
    counts: list[int]  # samples per shard, from the manifest
    shape: tuple[int, int, int]  # (C, H, W) of every image

    @property
    def count(self) -> int:
        return sum(self.counts)

    @cached_property
    def offsets(self) -> list[int]:
        """Index of each shard's first sample in the split (a sample's id = offset + position)."""
        return [sum(self.counts[:j]) for j in range(len(self.counts))]


def split_shards(location: str | Path, split: str, urls: str = "") -> SplitShards:
    """A split of the shard folder (or manifest file) `location`.

    urls: optional webdataset URL spec for the split's shards in manifest order, e.g. a brace pattern
    "pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -"; default: the files beside the manifest.
    """
    manifest = load_manifest(location)
    if split not in manifest["splits"]:
        raise KeyError(f"{location} has no {split!r} split; it has {sorted(manifest['splits'])}")
    entry = manifest["splits"][split]
    if urls:
        listed = wds.shardlists.expand_urls(urls)
        if len(listed) != len(entry["shards"]):
            raise ValueError(f"{urls!r} expands to {len(listed)} shards but the manifest lists {len(entry['shards'])}")
    else:
        folder = Path(location) if Path(location).suffix != ".json" else Path(location).parent
        listed = [str(folder / name) for name in entry["shards"]]
    if "shard_counts" not in entry:
        raise ValueError(f"the manifest of {location} has no per-shard counts (shard_counts): make the shards again "
                         f"with scripts/make_shards.sh")
    return SplitShards(listed, list(entry["shard_counts"]), tuple(entry["shape"]))


@dataclass
class ReadStats:
    """What reading skipped: a damaged shard or an undecodable sample is counted and warned about,
    or raised when strict. A wrong shape (ShardFormatError) is always raised."""

    strict: bool = False
    skipped: int = 0
    messages: list[str] = field(default_factory=list)

    def handle(self, exn: Exception) -> bool:
        if self.strict or isinstance(exn, ShardFormatError):
            raise exn
        self.skipped += 1
        self.messages.append(repr(exn))
        warnings.warn(f"skipping unreadable data: {exn!r}", stacklevel=2)
        return True  # tells webdataset to go on


def shard_samples(url: str, stats: ReadStats) -> Iterator[dict]:
    """The raw samples ({'__key__', 'png', 'cls', ...}) of one shard, in stored order."""
    yield from wds.tariterators.tarfile_samples([{"url": url}], handler=stats.handle)


def decode_sample(sample: dict, shape: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
    """(uint8 image [C, H, W], label) from a PNG payload, or (float32 array, label) from an .npy one
    (pre-encoded latents, latent_ndm.data.latent_shards); a wrong shape raises ShardFormatError naming shard and key."""
    where = f"shard {sample.get('__url__', '?')}, key {sample.get('__key__', '?')}"
    if "npy" in sample:
        arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if arr.dtype != np.float32 or tuple(arr.shape) != tuple(shape):
            raise ShardFormatError(f"{where}: array is {arr.dtype} {list(arr.shape)} but the manifest says "
                                   f"float32 {list(shape)}")
        return torch.from_numpy(arr.copy()), int(sample.get("cls", -1))  # np.load of bytes is read-only
    with Image.open(io.BytesIO(sample["png"])) as im:
        if im.mode in ("1", "P"):  # bilevel and palette images (from other writers) as 8-bit grey / RGB
            im = im.convert("L" if im.mode == "1" else "RGB")
        if im.mode not in ("L", "LA", "RGB", "RGBA"):
            raise ValueError(f"{where}: unsupported image mode {im.mode!r} (expected 8-bit grey or RGB)")
        bands, (w, h) = len(im.getbands()), im.size
        # bytearray: a writable buffer (torch refuses read-only ones); much faster than np.array(im).
        arr = np.frombuffer(bytearray(im.tobytes()), dtype=np.uint8).reshape(h, w, bands).transpose(2, 0, 1)
    if tuple(arr.shape) != tuple(shape):
        raise ShardFormatError(f"{where}: image is {list(arr.shape)} (C, H, W) but the manifest says {list(shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr)), int(sample.get("cls", -1))


def decode_or_skip(sample: dict, shape: tuple[int, int, int], stats: ReadStats) -> tuple[torch.Tensor, int] | None:
    try:
        return decode_sample(sample, shape)
    except ShardFormatError:
        raise
    except Exception as exn:  # a PNG that does not decode, a missing field
        stats.handle(exn)
        return None


def iterate_split(shards: SplitShards, stats: ReadStats, keep_shard: Callable[[int], bool] | None = None,
                  keep: Callable[[int], bool] | None = None) -> Iterator[tuple[torch.Tensor, int, int]]:
    """One deterministic pass in shard order: (image, label, id) for the samples of the shards j with
    keep_shard(j) whose id passes keep(id); other shards are not opened, other samples not decoded.

    id = the shard's offset + the sample's position in it: the same whoever reads it.
    """
    for j, (url, offset) in enumerate(zip(shards.urls, shards.offsets)):
        if keep_shard is not None and not keep_shard(j):
            continue
        for pos, sample in enumerate(shard_samples(url, stats)):
            if (keep is None or keep(offset + pos)) and (item := decode_or_skip(sample, shards.shape, stats)):
                yield item[0], item[1], offset + pos


def read_split(location: str | Path, split: str, strict: bool = False, stats: ReadStats | None = None) -> ImageData:
    """A whole split in memory, in stored order (for small data and tests)."""
    stats = stats if stats is not None else ReadStats(strict)
    stats.strict = strict
    items = list(iterate_split(split_shards(location, split), stats))
    if not items:
        raise ValueError(f"no readable samples in the {split} split of {location}")
    return ImageData(torch.stack([x for x, _, _ in items]).numpy(), np.asarray([y for _, y, _ in items]))


def make_shards(source: str, out_dir: str | Path, *, root: str = "", channels: int | None = None,
                center_crop: int | None = None, resize: int | None = None, patch: int = 32,
                download: bool = False, maxcount: int = 2000, shuffle_seed: int | None = 0,
                progress: bool = False) -> dict:
    """Write train and test shards of a source and the manifest; returns the manifest.

    The train split is written in a random order (shuffle_seed; None keeps the source order), the
    test split in source order.
    """
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
        seed = shuffle_seed if split == "train" else None
        manifest["splits"][split] = write_shards(data, out_dir, split, maxcount, seed, progress) | {"source": source}
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
    p.add_argument("--shuffle-seed", type=int, default=0, help="order of the train samples in the shards")
    p.add_argument("--no-shuffle", action="store_true", help="write the train split in source order")
    args = p.parse_args(argv)
    try:
        manifest = make_shards(args.source, args.out_dir, root=args.root, channels=args.channels,
                               center_crop=args.center_crop, resize=args.resize, patch=args.patch,
                               download=args.download, maxcount=args.maxcount,
                               shuffle_seed=None if args.no_shuffle else args.shuffle_seed, progress=True)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: {kk: v[kk] for kk in ("count", "shape", "shards")} for k, v in manifest["splits"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
