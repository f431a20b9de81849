"""Reading tar shards: the project's own (with manifest.json) and other tools' (without).

The project's shards (latent_ndm.data.writer, scripts/make_shards.sh) come with OUT_DIR/manifest.json
(counts, shape, channels, source, per-shard counts). Reading decodes every sample to a uint8 tensor
[C, H, W] (shards of pre-encoded latents, latent_ndm.data.latent_shards: a float32 array from an .npy
payload), and a sample of another shape stops at once, naming the shard and the key.

Shards written by other tools (webdataset's ShardWriter, img2dataset: `.jpg`/`.webp`/... images,
labels in `.cls` or a `.json` field) have no manifest: `foreign_split` counts their samples in one
scan, checks keys (no duplicates, no `..` or absolute member names), caches the counts beside the
shards (shard_index.json) and converts every image on reading to the configured size
(latent_ndm.data.images: the same conversions as make_shards).

A sample that does not decode or a damaged shard is skipped with a warning and counted (strict=True
makes it fatal). The training stream and the evaluation pass built on this are in
latent_ndm.data.streams.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from latent_ndm.data.images import Conversion, convert_image, open_image
from latent_ndm.data.sources import ImageData
from latent_ndm.data.writer import INCOMPLETE, MANIFEST

INDEX = "shard_index.json"


class ShardFormatError(ValueError):
    """A sample whose shape or channel count differs from the manifest: always fatal."""


def load_manifest(location: str | Path) -> dict:
    """The manifest of a shard folder (or the path of a manifest file itself)."""
    path = Path(location)
    path = path if path.suffix == ".json" else path / MANIFEST
    if not path.is_file():
        if list(path.parent.glob("*.tar")):
            raise FileNotFoundError(f"{path.parent} holds tar shards but no {MANIFEST}: this needs shards made by "
                                    "scripts/make_shards.sh (training and evaluation also read other tools' shards)")
        raise FileNotFoundError(f"{path} not found: make shards first, e.g. "
                                f"scripts/make_shards.sh mnist5k {path.parent}")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ForeignFormat:
    """How to read shards written by other tools: which sample fields hold the image (the first one
    present is used), where the label is ("cls", or "json.FIELD" for a field of the .json payload; -1
    when absent), and what every image is converted to."""

    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    label_key: str = "cls"
    conversion: Conversion = Conversion()


@dataclass
class SplitShards:
    """Where one split's shards are and what they hold: any URLs webdataset opens (paths, pipe:...)."""

    urls: list[str]
    counts: list[int]  # samples per shard, from the manifest or the index
    shape: tuple[int, int, int]  # (C, H, W) of every image
    foreign: ForeignFormat | None = None  # set for other tools' shards: images are converted on reading

    @property
    def count(self) -> int:
        return sum(self.counts)

    @cached_property
    def offsets(self) -> list[int]:
        """Index of each shard's first sample in the split (a sample's id = offset + position)."""
        return [sum(self.counts[:j]) for j in range(len(self.counts))]


def split_shards(location: str | Path, split: str, urls: str = "") -> SplitShards:
    """A split of the project shard folder (or manifest file) `location`.

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


def has_manifest(location: str | Path) -> bool:
    path = Path(location)
    return path.suffix == ".json" or (path / MANIFEST).is_file()


def dataset_version(location: str | Path) -> str | None:
    """Which version of a dataset shards came from, when it matters for comparing figures (the two
    downsampled ImageNets give different bits/dim): reports print it beside their numbers."""
    return load_manifest(location).get("dataset_version") if has_manifest(location) else None


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


def unsafe_key(key: str) -> bool:
    """A member name that would leave the folder it is extracted to (absolute, or with a .. part)."""
    path = PurePosixPath(key)
    return path.is_absolute() or ".." in path.parts


def shard_samples(url: str, stats: ReadStats) -> Iterator[dict]:
    """The raw samples ({'__key__', 'png', 'cls', ...}) of one shard, in stored order.

    A sample whose key repeats an earlier one of the shard, or whose member name is absolute or holds
    a `..` part, is kept in place (positions stay those of the index) but marked bad: decoding it fails.
    """
    seen: set[str] = set()
    for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=stats.handle):
        key = sample["__key__"]
        if unsafe_key(key):
            sample["__error__"] = f"member name {key!r} points outside the shard's folder: refused"
        elif key in seen:
            sample["__error__"] = f"key {key!r} appears twice in the shard"
        seen.add(key)
        yield sample


def _label(sample: dict, label_key: str) -> int:
    """The sample's integer label under label_key ("cls", "json.FIELD" or "none"); -1 when absent."""
    if label_key == "none":
        return -1
    if label_key.startswith("json."):
        if "json" not in sample:
            return -1
        value = json.loads(sample["json"]).get(label_key[5:])
        return -1 if value is None else int(value)
    return int(sample[label_key]) if label_key in sample else -1


def decode_sample(sample: dict, shape: tuple[int, int, int], foreign: ForeignFormat | None = None
                  ) -> tuple[torch.Tensor, int]:
    """(uint8 image [C, H, W], label) from an image payload, or (float32 array, label) from an .npy one
    (pre-encoded latents, latent_ndm.data.latent_shards). Project shards: a wrong shape raises
    ShardFormatError naming shard and key. Other tools' shards (foreign): the image is converted."""
    where = f"shard {sample.get('__url__', '?')}, key {sample.get('__key__', '?')}"
    if "__error__" in sample:
        raise ValueError(f"{where}: {sample['__error__']}")
    if foreign is not None:
        key = next((k for k in foreign.image_keys if k in sample), None)
        if key is None:
            raise ValueError(f"{where}: no image under any of the keys {', '.join(foreign.image_keys)} "
                             f"(the sample has {', '.join(k for k in sample if not k.startswith('__'))})")
        arr = convert_image(open_image(sample[key], where), foreign.conversion, where)
        if tuple(arr.shape) != tuple(shape):  # a grey image in an RGB folder without a channel conversion
            raise ValueError(f"{where}: image became {list(arr.shape)} (C, H, W), not {list(shape)}")
        return torch.from_numpy(arr), _label(sample, foreign.label_key)
    if "npy" in sample:
        arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if arr.dtype != np.float32 or tuple(arr.shape) != tuple(shape):
            raise ShardFormatError(f"{where}: array is {arr.dtype} {list(arr.shape)} but the manifest says "
                                   f"float32 {list(shape)}")
        return torch.from_numpy(arr.copy()), int(sample.get("cls", -1))  # np.load of bytes is read-only
    try:
        with Image.open(io.BytesIO(sample["png"])) as im:
            if im.mode in ("1", "P"):  # bilevel and palette images (from other writers) as 8-bit grey / RGB
                im = im.convert("L" if im.mode == "1" else "RGB")
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                raise ValueError(f"unsupported image mode {im.mode!r} (expected 8-bit grey or RGB)")
            bands, (w, h) = len(im.getbands()), im.size
            # bytearray: a writable buffer (torch refuses read-only ones); much faster than np.array(im).
            arr = np.frombuffer(bytearray(im.tobytes()), dtype=np.uint8).reshape(h, w, bands).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{where}: {e}") from e
    if tuple(arr.shape) != tuple(shape):
        raise ShardFormatError(f"{where}: image is {list(arr.shape)} (C, H, W) but the manifest says {list(shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr)), int(sample.get("cls", -1))


def decode_or_skip(sample: dict, shards: SplitShards, stats: ReadStats) -> tuple[torch.Tensor, int] | None:
    try:
        return decode_sample(sample, shards.shape, shards.foreign)
    except ShardFormatError:
        raise
    except Exception as exn:  # an image that does not decode, a missing field, a refused key
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
            if (keep is None or keep(offset + pos)) and (item := decode_or_skip(sample, shards, stats)):
                yield item[0], item[1], offset + pos


def _local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _stamp(url: str) -> list[int] | None:
    """(size, mtime) of a local shard, so that a rewritten shard invalidates the cached index."""
    if not _local(url):
        return None
    st = os.stat(url)
    return [st.st_size, st.st_mtime_ns]


def split_urls(folder: Path, split: str, urls: str) -> list[str]:
    """The shards of a split without a manifest: the URL spec when given, else folder/{split}-*.tar."""
    if urls:
        return wds.shardlists.expand_urls(urls)
    return [str(p) for p in sorted(folder.glob(f"{split}-*.tar"))]


def scan_split(urls: list[str], foreign: ForeignFormat, progress: bool = False) -> dict:
    """Count the samples of each shard in one pass, refusing duplicate keys and unsafe member names."""
    from tqdm.auto import tqdm

    counts, without_image, first_seen = [], 0, {}
    stats = ReadStats(strict=True)  # a shard that cannot be read at all must not get a count
    for j, url in enumerate(tqdm(urls, desc="indexing shards", unit="shard", disable=not progress)):
        n = 0
        try:
            for sample in shard_samples(url, stats):
                key = sample["__key__"]
                if unsafe_key(key):
                    raise ShardFormatError(f"member name {key!r} points outside the shard's folder: refused")
                if key in first_seen:
                    raise ShardFormatError(f"key {key!r} appears twice (first in {urls[first_seen[key]]})")
                first_seen[key] = j
                without_image += not any(k in sample for k in foreign.image_keys)
                try:
                    _label(sample, foreign.label_key)
                except (ValueError, TypeError, AttributeError) as e:
                    raise ShardFormatError(f"key {key!r}: the label under {foreign.label_key!r} is not an integer "
                                           f"({e}); set data.label_key (cls, json.FIELD, or none)") from e
                n += 1
        except Exception as e:  # webdataset's own errors (e.g. a member repeated) name neither shard nor key
            raise ShardFormatError(f"shard {url}: {e.args[0] if e.args else e}") from e
        counts.append(n)
    return {"urls": urls, "counts": counts, "stamps": [_stamp(u) for u in urls], "without_image": without_image}


def foreign_split(folder: str | Path, split: str, train_urls: str, test_urls: str, foreign: ForeignFormat,
                  channels: int, size: int) -> SplitShards:
    """A split of shards written by another tool (no manifest): counts from folder/shard_index.json when
    it matches the shards (same URLs, same local sizes and times), else from one scan, then cached there.

    A user may also write that file to skip the scan: {"train": {"urls": [...], "counts": [...]}, "test":
    ...}, the URLs as data.train_urls / data.test_urls expand (or the folder's {split}-*.tar). Such an
    entry (without "stamps") is trusted; a shard holding more samples than its count stops the run. The
    train and test shards must not overlap.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (data.shards: a shard folder)")
    if (folder / INCOMPLETE).exists() or list(folder.glob("*.tar.partial")):
        raise FileNotFoundError(f"{folder} is a make_shards folder that was not finished (no {MANIFEST}): run "
                                "scripts/make_shards.sh again")
    lists = {"train": split_urls(folder, "train", train_urls), "test": split_urls(folder, "test", test_urls)}
    for name, listed in lists.items():
        if not listed:
            raise FileNotFoundError(
                f"{folder} has no {MANIFEST} and no {name}-*.tar shards: make shards with scripts/make_shards.sh, "
                f"or name the {name} shards of another tool with data.{name}_urls "
                f"(e.g. \"{folder}/{{00000..00099}}.tar\")")
    if set(lists["train"]) & set(lists["test"]):
        raise ValueError(f"the train and test shards overlap ({sorted(set(lists['train']) & set(lists['test']))[:3]} "
                         "...): test figures would be measured on training images")
    urls = lists[split]
    index_path = folder / INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    entry = index.get(split)
    # An entry without stamps was written by the user (urls and counts): trusted as it is.
    if not entry or entry.get("urls") != urls or ("stamps" in entry and entry["stamps"] != [_stamp(u) for u in urls]):
        entry = scan_split(urls, foreign, progress=True)
        index[split] = entry
        try:
            tmp = folder / f".{INDEX}.{os.getpid()}"
            tmp.write_text(json.dumps(index, indent=1))
            os.replace(tmp, index_path)
        except OSError as e:
            warnings.warn(f"cannot cache the shard index in {folder} ({e}); every run will scan again", stacklevel=2)
    if len(entry["counts"]) != len(urls):
        raise ValueError(f"{index_path}: {len(entry['counts'])} counts for {len(urls)} {split} shards")
    if entry.get("without_image"):
        warnings.warn(f"{entry['without_image']} {split} samples hold none of the image keys "
                      f"{', '.join(foreign.image_keys)}: they will be skipped (data.image_keys)", stacklevel=2)
    return SplitShards(urls, list(entry["counts"]), (channels, size, size), foreign)


def read_split(location: str | Path, split: str, strict: bool = False, stats: ReadStats | None = None) -> ImageData:
    """A whole split in memory, in stored order (for small data and tests)."""
    stats = stats if stats is not None else ReadStats(strict)
    stats.strict = strict
    items = list(iterate_split(split_shards(location, split), stats))
    if not items:
        raise ValueError(f"no readable samples in the {split} split of {location}")
    return ImageData(torch.stack([x for x, _, _ in items]).numpy(), np.asarray([y for _, y, _ in items]))
