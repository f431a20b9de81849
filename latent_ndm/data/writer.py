"""Images to tar shards (webdataset layout, lossless PNG) with a JSON manifest, streaming.

`python -m latent_ndm.data.writer SOURCE OUT_DIR [options]` (scripts/make_shards.sh) writes
OUT_DIR/{train,test}-000000.tar ... and OUT_DIR/manifest.json (counts, shape, channels, source,
per-shard counts, how the splits were made, what was skipped). Images are read, converted
(latent_ndm.data.images) and written one at a time, by `--workers` processes, and the result is the
same for any number of workers: same shards, same order, byte-identical tars (fixed tar headers).
Memory does not grow with the number of images beyond the source's index (a folder's file list).

A shard is written as NAME.partial and renamed when complete; the manifest is written last, and a
`.incomplete` marker lives in the folder until then. A run that stops half-way leaves no manifest and
the marker, so nothing can train on a partial folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from latent_ndm.data.images import BadImage, Conversion, encode_items
from latent_ndm.data.sources import (
    BUILT_IN,
    ArraySplit,
    ImageData,
    Source,
    SplitSource,
    folder_source,
    imagenet_npz,
    imagenet_png,
    load_torchvision,
    npz_split,
)

MANIFEST = "manifest.json"
INCOMPLETE = ".incomplete"  # present while make_shards writes a folder: nothing may read it meanwhile
# Tar headers are fixed (time, owner, mode), so that the same images give byte-identical shards.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
CHUNK = 32  # images per task sent to a conversion worker

SOURCES = ("mnist5k", "digits", "photo-patches", "folder", "npz", "cifar10", "mnist",
           "imagenet32-png", "imagenet64-png", "imagenet32-npz", "imagenet64-npz")


class ShardSink:
    """Writes samples to {split}-NNNNNN.tar, maxcount per shard."""

    def __init__(self, out_dir: Path, split: str, maxcount: int):
        self.out_dir, self.split, self.maxcount = out_dir, split, maxcount
        self.names: list[str] = []
        self.counts: list[int] = []
        self.tar: tarfile.TarFile | None = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self.tar is None or self.counts[-1] == self.maxcount:
            self._next()
        for ext, payload in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), TAR_MTIME, 0o444
            info.uname = info.gname = "latent-ndm"
            self.tar.addfile(info, _Reader(payload))
        self.tar.members = []  # TarFile keeps every header it wrote: memory would grow with the shard
        self.counts[-1] += 1

    def _next(self) -> None:
        self._finish()
        self.names.append(f"{self.split}-{len(self.names):06d}.tar")
        self.counts.append(0)
        self.tar = tarfile.open(self.out_dir / (self.names[-1] + ".partial"), "w", format=tarfile.USTAR_FORMAT)

    def _finish(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.out_dir / (self.names[-1] + ".partial"), self.out_dir / self.names[-1])
            self.tar = None

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            (self.out_dir / (self.names[-1] + ".partial")).unlink(missing_ok=True)
            self.tar = None


class _Reader:
    """A minimal file object over bytes for TarFile.addfile (avoids a copy into BytesIO)."""

    def __init__(self, data: bytes):
        self.view, self.pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else self.pos + n
        out, self.pos = self.view[self.pos : end].tobytes(), min(end, len(self.view))
        return out


def _converted(split: SplitSource, order: np.ndarray, conv: Conversion, workers: int) -> Iterator[tuple]:
    """(source index, (png, error, shape, upscaled)) for every index in `order`, in that order.

    With workers > 1, chunks go to worker processes; at most 4 chunks per worker are in flight, so
    memory stays flat however many images there are. (Like all of multiprocessing, this needs a main
    module that can be imported again: a script file, `python -m`, or an interactive session.)
    """
    chunks = (order[k : k + CHUNK] for k in range(0, len(order), CHUNK))
    if workers <= 1:
        for idx in chunks:
            yield from zip(idx.tolist(), encode_items([split.item(i) for i in idx.tolist()], conv))
        return
    # forkserver: workers start from a clean interpreter that imports only what the tasks need
    # (PIL, numpy), not the parent's torch; fork after threads have started is unsafe. An executor,
    # not a Pool: a worker that dies (killed, out of memory) raises BrokenProcessPool instead of a hang.
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["latent_ndm.data.images", "latent_ndm.data.sources"])
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        pending: deque = deque()
        for idx in chunks:
            pending.append((idx, pool.submit(encode_items, [split.item(i) for i in idx.tolist()], conv)))
            if len(pending) >= 4 * workers:
                idx, result = pending.popleft()
                yield from zip(idx.tolist(), result.result())
        while pending:
            idx, result = pending.popleft()
            yield from zip(idx.tolist(), result.result())
    except BrokenProcessPool as e:
        raise RuntimeError(f"a conversion worker died ({e}); rerun with --workers 1 to see the cause in-process, "
                           "or check memory limits") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_split(split: SplitSource, out_dir: str | Path, name: str, conv: Conversion | None = None,
                maxcount: int = 2000, shuffle_seed: int | None = None, workers: int = 1, skip_bad: bool = False,
                progress: bool = False) -> dict:
    """Write one split as {name}-NNNNNN.tar shards; returns its manifest entry.

    shuffle_seed: write the samples in a seeded random order (for training data: a streaming reader
    then reads whole shards at a time and still sees every class in every shard). The key keeps the
    source index, {name}_NNNNNNNN, so any order maps back to the source. A bad image (BadImage) stops
    the run naming its file, or with skip_bad is left out and counted.
    """
    conv = conv or Conversion()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob(f"{name}-*.tar"), *out_dir.glob(f"{name}-*.tar.partial")]:
        old.unlink()
    n = len(split)
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    if maxcount < 1:
        raise ValueError(f"--maxcount must be at least 1, got {maxcount}")
    sink, shape, first = ShardSink(out_dir, name, maxcount), None, ""
    skipped, examples = 0, []
    upscaled = 0
    bar = tqdm(total=n, desc=f"{name} shards", unit="img", disable=not progress, smoothing=0.1)
    try:
        for i, (png, error, image_shape, up) in _converted(split, order, conv, workers):
            bar.update()
            if error is not None:
                if not skip_bad:
                    raise BadImage(f"{error} (pass --skip-bad to leave such images out)")
                skipped += 1
                examples += [error][: 20 - len(examples)]
                continue
            if shape is None:
                shape, first = image_shape, split.item(i).name
            elif image_shape != shape:
                hint = ("pass --resize S (and --channels C) so that every image gets one size"
                        if conv.resize is None else "pass --channels C so that every image has one channel count")
                raise ValueError(f"{split.item(i).name} becomes {list(image_shape)} (C, H, W) but {first} became "
                                 f"{list(shape)}: {hint}")
            upscaled += up
            sink.write(f"{name}_{i:08d}", {"cls": str(split.label(i)).encode(), "png": png})
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    if shape is None:
        raise ValueError(f"no image of the {name} split could be read ({skipped} skipped; first: {examples[:1]})")
    return {"count": sum(sink.counts), "shards": sink.names, "shard_counts": sink.counts,
            "shape": [int(s) for s in shape], "dtype": "uint8", "channels": int(shape[0]), "split": name,
            "shuffled": shuffle_seed is not None, "skipped": skipped, "skipped_examples": examples,
            "upscaled": upscaled}


def write_shards(data: ImageData, out_dir: str | Path, split: str, maxcount: int = 2000,
                 shuffle_seed: int | None = None, progress: bool = False) -> dict:
    """Write in-memory images as one split (tests, small data); returns its manifest entry."""
    return write_split(ArraySplit(data, split), out_dir, split, Conversion(), maxcount, shuffle_seed, 1,
                       progress=progress)


def open_source(source: str, root: str = "", *, patch: int = 32, download: bool = False,
                test_fraction: float | None = None, test_folder: str | None = None, skip_bad: bool = False,
                extract_dir: Path | None = None) -> Source:
    """The train and test splits of a named source (SOURCES)."""
    if (test_fraction is not None or test_folder) and source != "folder":
        raise ValueError(f"--test-fraction and --test-folder are for the folder source; {source} has a test split")
    if source in BUILT_IN:
        load = BUILT_IN[source]
        return Source({s: ArraySplit(load(s, patch) if source == "photo-patches" else load(s), s)
                       for s in ("train", "test")})
    if not root and source not in BUILT_IN:
        raise ValueError(f"the {source} source needs --root")
    if source == "folder":
        return folder_source(root, test_fraction, test_folder, skip_bad)
    if source == "npz":
        return Source({s: npz_split(Path(root) / f"{s}.npz", extract_dir=extract_dir) for s in ("train", "test")})
    if source in ("cifar10", "mnist"):
        return Source({s: ArraySplit(load_torchvision(source, root, s, download), s) for s in ("train", "test")})
    if source.startswith("imagenet") and source[8:10] in ("32", "64"):
        size, kind = int(source[8:10]), source.rsplit("-", 1)[1]
        if kind == "png":
            return imagenet_png(root, size, skip_bad)
        if kind == "npz":
            return imagenet_npz(root, size, extract_dir)
    raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")


def make_shards(source: str, out_dir: str | Path, *, root: str = "", channels: int | None = None,
                center_crop: int | None = None, resize: int | None = None, filter: str = "bicubic",
                background: int = 255, patch: int = 32, download: bool = False, maxcount: int = 2000,
                shuffle_seed: int | None = 0, workers: int = 1, skip_bad: bool = False,
                test_fraction: float | None = None, test_folder: str | None = None, progress: bool = False) -> dict:
    """Write train and test shards of a source and the manifest; returns the manifest.

    The train split is written in a random order (shuffle_seed; None keeps the source order), the
    test split in source order. Image folders become RGB unless channels=1 is asked for.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A folder being (re)written is never mistaken for a finished one: no manifest until the end, and a
    # marker that also stops it from being read as another tool's shards (latent_ndm.data.shards).
    (out_dir / INCOMPLETE).write_text("make_shards has not finished writing this folder\n")
    (out_dir / MANIFEST).unlink(missing_ok=True)
    extract_dir = out_dir / ".extracted"
    if channels is None and source in ("folder", "imagenet32-png", "imagenet64-png"):
        channels = 3
    conv = Conversion(channels, center_crop, resize, background, filter)
    try:
        src = open_source(source, root, patch=patch, download=download, test_fraction=test_fraction,
                          test_folder=test_folder, skip_bad=skip_bad, extract_dir=extract_dir)
        manifest = {"source": source, "root": str(root), "splits": {}, **src.info,
                    "options": {"channels": channels, "center_crop": center_crop, "resize": resize, "filter": filter,
                                "background": background, "patch": patch, "test_fraction": test_fraction,
                                "test_folder": test_folder, "skip_bad": skip_bad, "maxcount": maxcount,
                                "shuffle_seed": shuffle_seed}}
        for split in ("train", "test"):
            seed = shuffle_seed if split == "train" else None
            entry = write_split(src.splits[split], out_dir, split, conv, maxcount, seed, workers, skip_bad, progress)
            manifest["splits"][split] = entry | {"source": source}
    finally:
        if extract_dir.exists():
            for f in extract_dir.iterdir():
                f.unlink()
            extract_dir.rmdir()
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / MANIFEST)
    (out_dir / INCOMPLETE).unlink()
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_shards.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help=" | ".join(SOURCES))
    p.add_argument("out_dir")
    p.add_argument("--root", default="", help="folder: the images; npz: train.npz/test.npz; cifar10/mnist: the "
                   "torchvision root; imagenetS-png: train_SxS/ and valid_SxS/; imagenetS-npz: the unzipped batches")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="folder without train/ and test/: hold out this fraction for testing (by a hash of each path)")
    p.add_argument("--test-folder", default=None, help="folder without train/ and test/: the test images")
    p.add_argument("--channels", type=int, default=None, help="1 (grey) or 3 (RGB; the default for image folders)")
    p.add_argument("--center-crop", type=int, default=None, help="the central CxC square (before --resize)")
    p.add_argument("--resize", type=int, default=None,
                   help="SxS; a non-square image is first cropped to the central square of its short side")
    p.add_argument("--filter", default="bicubic", help="resize filter: bicubic | lanczos | box | bilinear")
    p.add_argument("--background", type=int, default=255, help="grey level under transparent pixels")
    p.add_argument("--patch", type=int, default=32, help="photo-patches: patch size")
    p.add_argument("--download", action="store_true", help="torchvision sources: download if missing")
    p.add_argument("--maxcount", type=int, default=2000, help="samples per shard")
    p.add_argument("--shuffle-seed", type=int, default=0, help="order of the train samples in the shards")
    p.add_argument("--no-shuffle", action="store_true", help="write the train split in source order")
    p.add_argument("--workers", type=int, default=1, help="conversion processes (the output does not depend on it)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out (and count) unreadable images instead of stopping at the first")
    args = p.parse_args(argv)
    try:
        manifest = make_shards(args.source, args.out_dir, root=args.root, channels=args.channels,
                               center_crop=args.center_crop, resize=args.resize, filter=args.filter,
                               background=args.background, patch=args.patch, download=args.download,
                               maxcount=args.maxcount, shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
                               workers=args.workers, skip_bad=args.skip_bad, test_fraction=args.test_fraction,
                               test_folder=args.test_folder, progress=True)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ModuleNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: {kk: v[kk] for kk in ("count", "shape", "skipped", "upscaled")} | {"shards": len(v["shards"])}
               for k, v in manifest["splits"].items()}
    for key in ("dataset_version", "split_rule", "ignored_files", "unreadable_entries"):
        if manifest.get(key):
            summary[key] = manifest[key]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
