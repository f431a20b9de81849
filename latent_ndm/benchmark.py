"""Training-step time of NDM against its F = identity baseline, measured side by side in one run.

`python -m latent_ndm.benchmark speed [--config configs/ndm_mnist.yaml] [--batch-size 32] [--steps 20]`
Variants are timed in interleaved rounds, so drifts in machine load hit all of them alike; the
reported figure per variant is the median over rounds, and ratios are against the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .config import load_config
from .experiment import pixel_task
from .noise import Noise

VARIANTS = {
    "baseline (F = identity, continuous)": ["model.transform=identity", "model.num_steps=0"],
    "NDM continuous": ["model.transform=neural", "model.num_steps=0"],
    "NDM discrete T=10": ["model.transform=neural", "model.num_steps=10"],
}


def speed(config: str, batch_size: int, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    states = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(config, [*overrides, f"train.batch_size={batch_size}"])
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed"])
    p.add_argument("--config", default="configs/ndm_mnist.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    result = speed(args.config, args.batch_size, args.steps, args.rounds)
    print(json.dumps({"config": args.config, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "results": result}, indent=2))
    print("\n| variant | s/step | ratio | images/s | params |\n| --- | --- | --- | --- | --- |")
    for name, r in result.items():
        print(f"| {name} | {r['sec_per_step']:.3f} | {r['ratio_to_baseline']:.2f} | {r['images_per_sec']:.1f} "
              f"| {r['params']:,} |")


if __name__ == "__main__":
    main()
