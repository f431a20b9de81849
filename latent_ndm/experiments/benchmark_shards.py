"""make_shards at scale: throughput with 1 and 2 workers and peak memory for a small and a 4x larger folder.

`scripts/benchmark.sh shards [--images 20000] [--large 80000] [--size 32]` builds a synthetic folder of
mixed-size images (40-300 px a side, any aspect; 80% RGB JPEG, 10% grey JPEG, 10% RGBA PNG; smooth
content so the files stay small), then shards it to size x size with a 5% hold-out, each run in a fresh
process: the first `--images` images with 1 and with 2 workers (images/s, and whether the shards are
byte-identical), and all `--large` images with 2 workers. Peak memory is the largest resident set of
the writing process and, separately, of its largest worker (Linux /proc), so the two folder sizes compare directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

PER_FOLDER = 1000


def _make_image(args: tuple[str, int]) -> None:
    root, i = args
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(40, 301, 2))
    # A 4x4 random colour field, upsampled: smooth like a photograph, a few KB as JPEG.
    im = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    folder = Path(root) / f"c{i // PER_FOLDER:03d}"
    kind = i % 10
    if kind == 0:
        im.convert("L").save(folder / f"{i:07d}.jpg", quality=90)
    elif kind == 1:
        alpha = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        rgba = im.convert("RGBA")
        rgba.putalpha(alpha)
        rgba.save(folder / f"{i:07d}.png")
    else:
        im.save(folder / f"{i:07d}.jpg", quality=90)


def synthetic_folder(root: Path, n: int, workers: int = 2) -> None:
    """n images in sub-folders of PER_FOLDER (the classes)."""
    for c in range((n + PER_FOLDER - 1) // PER_FOLDER):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    with mp.get_context("forkserver").Pool(workers) as pool:
        for _ in pool.imap_unordered(_make_image, [(str(root), i) for i in range(n)], chunksize=256):
            pass


def _descendants(pid: int) -> list[int]:
    children = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            children.setdefault(int(fields["PPid"]), []).append(int(status.parent.name))
        except (OSError, KeyError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _peak_kib(pid: int) -> int:
    """A process's peak resident set so far (VmHWM), 0 when it is gone."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1])
    except (OSError, StopIteration):
        return 0


def run_once(root: str, out: str, workers: int, size: int) -> dict:
    """One make_shards run in this (fresh) process; its time, output digest and peak memory.

    Peak memory is VmHWM (Linux /proc): getrusage's ru_maxrss would include the parent's resident set
    from before exec, and does not see the conversion workers (children of the forkserver, not of this
    process), whose peaks a thread reads every 0.2 s.
    """
    from latent_ndm.data.writer import make_shards

    worker_peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            for pid in _descendants(os.getpid()):
                worker_peak[0] = max(worker_peak[0], _peak_kib(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    manifest = make_shards("folder", out, root=root, resize=size, test_fraction=0.05, workers=workers, maxcount=5000)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    digest = hashlib.sha256()
    for tar in sorted(Path(out).glob("*.tar")):
        digest.update(tar.name.encode())
        with open(tar, "rb") as f:  # in pieces: reading a whole shard would itself raise the peak
            while block := f.read(1 << 20):
                digest.update(block)
    count = sum(s["count"] for s in manifest["splits"].values())
    return {"images": count, "seconds": seconds, "images_per_sec": count / seconds, "sha256": digest.hexdigest(),
            "peak_rss_mib_writer": _peak_kib(os.getpid()) / 1024,
            "peak_rss_mib_worker": worker_peak[0] / 1024,
            "torch_imported": "torch" in sys.modules}


def _fresh(root: Path, out: Path, workers: int, size: int) -> dict:
    code = ("import json, sys; from latent_ndm.experiments.benchmark_shards import run_once; "
            "print(json.dumps(run_once(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(out), str(workers), str(size)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"make_shards failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shards(images: int = 20000, large: int = 80000, size: int = 32, keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        synthetic_folder(tmp / "large", large)
        # The small folder: the first images // PER_FOLDER class folders of the large one, linked.
        (tmp / "small").mkdir()
        for c in range(images // PER_FOLDER):
            (tmp / "small" / f"c{c:03d}").symlink_to(tmp / "large" / f"c{c:03d}")
        made = time.perf_counter() - t0
        megabytes = sum(f.stat().st_size for f in (tmp / "large").rglob("*")) / 2**20
        runs = {"small, 1 worker": _fresh(tmp / "small", tmp / "s1", 1, size),
                "small, 2 workers": _fresh(tmp / "small", tmp / "s2", 2, size),
                "large, 2 workers": _fresh(tmp / "large", tmp / "l2", 2, size)}
    small1, small2, large2 = runs.values()
    return {
        "folder": {"small_images": images, "large_images": large, "large_mib": round(megabytes, 1),
                   "seconds_to_make": round(made, 1), "size": size, "cpus": os.cpu_count()},
        "runs": runs,
        "speedup_2_over_1_workers": small2["images_per_sec"] / small1["images_per_sec"],
        "identical_shards_1_and_2_workers": small1["sha256"] == small2["sha256"],
        "peak_rss_large_over_small_writer": large2["peak_rss_mib_writer"] / small2["peak_rss_mib_writer"],
        "peak_rss_large_over_small_worker": large2["peak_rss_mib_worker"] / small2["peak_rss_mib_worker"],
    }


def markdown(result: dict) -> str:
    f = result["folder"]
    lines = [f"make_shards: mixed-size folder to {f['size']}x{f['size']} shards ({f['cpus']} CPUs)", "",
             "| run | images | images/s | peak RSS writer (MiB) | peak RSS per worker (MiB) |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in result["runs"].items():
        worker = f"{r['peak_rss_mib_worker']:.0f}" if "2 workers" in name else "(none)"
        lines.append(f"| {name} | {r['images']:,} | {r['images_per_sec']:,.0f} | {r['peak_rss_mib_writer']:.0f} | "
                     f"{worker} |")
    lines += ["", f"2 workers / 1 worker: {result['speedup_2_over_1_workers']:.2f}x; byte-identical shards: "
              f"{result['identical_shards_1_and_2_workers']}",
              f"peak RSS, {f['large_images']:,} / {f['small_images']:,} images: writer "
              f"{result['peak_rss_large_over_small_writer']:.2f}x, "
              f"worker {result['peak_rss_large_over_small_worker']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--large", type=int, default=80000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--tmp", type=Path, default=None, help="where to build the folders (default: the system's)")
    p.add_argument("--out", type=Path, default=None, help="also write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.images % PER_FOLDER or args.large < args.images:
        p.error(f"--images must be a multiple of {PER_FOLDER} and at most --large")
    result = shards(args.images, args.large, args.size, args.tmp)
    text = markdown(result)
    print(json.dumps(result, indent=2))
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
