"""Benchmarks measured side by side in one run.

`python -m latent_ndm.benchmark speed [--config configs/ndm_mnist.yaml] [--batch-size 32] [--steps 20]`:
training-step time of NDM against its F = identity baseline. Variants are timed in interleaved
rounds, so drifts in machine load hit all of them alike; the reported figure per variant is the
median over rounds, and ratios are against the baseline.

`python -m latent_ndm.benchmark data [--images 8192]`: decoded images per second from local shards
(28x28 MNIST subset, 32x32 photo patches) with 1 and 2 decoding workers, beside the images per
second the quickstart's training consumes (its config, batch 32, NDM and baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .config import DataConfig, load_config
from .data import train_batches
from .experiment import pixel_task
from .noise import Noise
from .shards import make_shards

VARIANTS = {
    "baseline (F = identity, continuous)": ["model.transform=identity", "model.num_steps=0"],
    "NDM continuous": ["model.transform=neural", "model.num_steps=0"],
    "NDM discrete T=10": ["model.transform=neural", "model.num_steps=10"],
}


def speed(config: str, batch_size: int, steps: int, rounds: int, variants: int | None = None,
          extra: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    states = {}
    for name, overrides in list(VARIANTS.items())[:variants]:
        cfg = load_config(config, [*overrides, f"train.batch_size={batch_size}", "data.num_workers=0", *extra])
        task = pixel_task(cfg)
        model = task.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        states[name] = (task, model, opt, task.train_batches(0), torch.Generator().manual_seed(0))

    def step(name: str) -> float:
        task, model, opt, stream, gen = states[name]
        images = next(stream).images
        t0 = time.perf_counter()
        nats, _ = task.objective(model, images, Noise.from_generator(gen, len(images)))
        (nats.mean() * task.objective.loss_scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in states:  # warm-up: allocator, first forward-AD use
        step(name)
    times: dict[str, list[float]] = {name: [] for name in states}
    for _ in range(rounds):
        for name in states:
            times[name] += [step(name) for _ in range(steps)]
    base = statistics.median(times[next(iter(VARIANTS))])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        n_params = sum(p.numel() for p in states[name][1].parameters())
        out[name] = {"sec_per_step": med, "ratio_to_baseline": med / base, "params": n_params,
                     "images_per_sec": batch_size / med}
    return out


def loader_rate(cfg: DataConfig, batch_size: int, images: int) -> float:
    """Decoded images per second from a fresh training stream (after its first batch: worker start-up)."""
    stream = train_batches(cfg, batch_size, seed=0)
    next(stream)
    n, t0 = 0, time.perf_counter()
    while n < images:
        n += len(next(stream).images)
    return n / (time.perf_counter() - t0)


def data(config: str, images: int, batch_size: int = 256) -> dict:
    """Loader images/s (1 and 2 workers, 28x28 and 32x32) and the training's consumption, in one run."""
    result: dict = {"loader_images_per_sec": {}, "training_images_per_sec": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"28x28 mnist5k": ("mnist5k", 1, 28), "32x32 photo-patches": ("photo-patches", 3, 32)}
        for name, (source, channels, size) in sets.items():
            make_shards(source, Path(tmp) / source, maxcount=1000)
            for workers in (1, 2):
                cfg = DataConfig(shards=str(Path(tmp) / source), channels=channels, image_size=size,
                                 num_workers=workers)
                result["loader_images_per_sec"][f"{name}, {workers} worker{'s' * (workers > 1)}"] = \
                    loader_rate(cfg, batch_size, images)
        train_batch = load_config(config).train.batch_size
        timed = speed(config, train_batch, steps=5, rounds=2, variants=2, extra=(f"data.shards={tmp}/mnist5k",))
    for name, r in timed.items():
        result["training_images_per_sec"][name] = r["images_per_sec"]
    fastest_training = max(result["training_images_per_sec"].values())
    result["slowest_loader_over_fastest_training"] = min(result["loader_images_per_sec"].values()) / fastest_training
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "data"])
    p.add_argument("--config", default="configs/ndm_mnist.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=8192, help="data: images decoded per loader measurement")
    args = p.parse_args()
    if args.what == "data":
        result = data(args.config, args.images)
        print(json.dumps({"config": args.config, "threads": torch.get_num_threads(), **result}, indent=2))
        print("\n| what | images/s |\n| --- | --- |")
        for group in ("loader_images_per_sec", "training_images_per_sec"):
            for name, rate in result[group].items():
                print(f"| {'loader' if group.startswith('loader') else 'training'}: {name} | {rate:,.0f} |")
        print(f"\nslowest loader / fastest training: {result['slowest_loader_over_fastest_training']:.0f}x")
        return
    result = speed(args.config, args.batch_size, args.steps, args.rounds)
    print(json.dumps({"config": args.config, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "results": result}, indent=2))
    print("\n| variant | s/step | ratio | images/s | params |\n| --- | --- | --- | --- | --- |")
    for name, r in result.items():
        print(f"| {name} | {r['sec_per_step']:.3f} | {r['ratio_to_baseline']:.2f} | {r['images_per_sec']:.1f} "
              f"| {r['params']:,} |")


if __name__ == "__main__":
    main()
