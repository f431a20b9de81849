"""Benchmarks measured side by side in one run.

`python -m latent_ndm.experiments.benchmark speed [--config configs/bench_cifar_size.yaml] [--batch-size 32]
[--bf16] [--channels-last] [--compile] [--out docs/bench/cpu]`: training steps of the F = identity
baseline, NDM discrete (T = 10), NDM continuous with the same denoiser (and the same U-Net inside F) and
NDM continuous with the time-separable F (the transform U-Net with K output groups and no time input):
images/s, time ratio to the baseline, FLOPs per step (torch.utils.flop_counter: matmuls and
convolutions, forward and backward), achieved FLOP/s and MFU against the fp32 and bf16 matmul peaks
measured in the same run, peak memory (RSS of a fresh process on CPU, max allocated on GPU); then
images/s of every sampler at a given number of network evaluations. Variants are timed in interleaved
rounds, so drifts in machine load hit all of them alike; the figure per variant is the median.
`--variants baseline,reference` times the baseline beside diffusers' UNet2DModel (a common reference
network) in the baseline's place: the same objective, batch and optimizer, another network.

`python -m latent_ndm.experiments.benchmark convs [--config ...] [--out docs/bench/convs]`: the denoiser's convolutions
alone (forward and backward), fp32 and bf16, NCHW and channels_last, as FLOP/s and share of the matmul
peak measured beside them: an upper bound on what the step's MFU can reach on this machine.

`python -m latent_ndm.experiments.benchmark shards [--images 20000] [--large 80000]`: make_shards on a
synthetic mixed-size folder, images/s with 1 and 2 workers and peak memory at two folder sizes
(latent_ndm/experiments/benchmark_shards.py).

`python -m latent_ndm.experiments.benchmark data [--images 8192]`: decoded images per second from local shards
(28x28 MNIST subset, 32x32 photo patches) with 1 and 2 decoding workers, beside the images per
second the quickstart's training consumes (its config, batch 32, NDM and baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from latent_ndm.config import DataConfig, load_config
from latent_ndm.core.noise import Noise
from latent_ndm.data.streams import train_batches
from latent_ndm.data.writer import make_shards
from latent_ndm.experiments.benchmark_convs import _sync, conv_rate, conv_shapes, convs, matmul_peak  # noqa: F401 (API)
from latent_ndm.experiments.benchmark_report import convs_markdown, markdown, write_report
from latent_ndm.nets.build import build_loss, build_ndm
from latent_ndm.sampling.samplers import SAMPLERS
from latent_ndm.tasks.diffusion import NELBOObjective
from latent_ndm.tasks.pixel import build_pixel_model
from latent_ndm.training import malloc
from latent_ndm.training.guards import bf16_fast

VARIANTS = {
    "baseline (F = identity, continuous)": ["model.transform=identity", "model.num_steps=0"],
    "NDM discrete T=10": ["model.transform=neural", "model.num_steps=10"],
    "NDM continuous": ["model.transform=neural", "model.num_steps=0"],
    "NDM separable continuous": ["model.transform=separable", "model.num_steps=0"],
}
BASELINE = next(iter(VARIANTS))
# A widely used reference network: diffusers' UNet2DModel at 6.47M parameters, trained here as the baseline's
# denoiser network, so that only the network differs from the baseline row. diffusers is not a dependency of
# latent-ndm; only this row needs it.
REFERENCE = "reference: diffusers UNet2DModel as the baseline's denoiser"
SHORT_NAMES = dict(zip(("baseline", "discrete", "continuous", "separable"), VARIANTS)) | {"reference": REFERENCE}


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel (block_out_channels 64, 128, 128; attention at 16x16) behind the denoiser's
    net(z, t) signature; t in [0, 1] is scaled to the 0..1000 timesteps its sinusoidal embedding expects."""

    def __init__(self, channels: int, image_size: int):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError as e:
            raise ImportError("the reference row needs diffusers, which latent-ndm does not depend on: "
                              "`pip install diffusers` into .venv to compare against it") from e
        self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                block_out_channels=(64, 128, 128),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t * 1000).sample


@dataclass
class Switches:
    """How the step runs: bf16 autocast, channels_last tensors, torch.compile of the denoiser network (the
    path without forward-mode AD; F's network is never compiled, docs/MATH.md section 6.1), the device."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str = "cpu"


class Step:
    """One variant's model, optimizer and fixed batch; `run()` is one timed training step."""

    def __init__(self, config: str, variant: str, batch_size: int, sw: Switches, extra: tuple[str, ...] = (),
                 table: dict[str, list[str]] | None = None):
        reference = variant == REFERENCE
        table = table or VARIANTS  # variant name -> its config overrides
        cfg = load_config(config, [*table[BASELINE if reference else variant], f"train.batch_size={batch_size}",
                                   *extra])
        torch.manual_seed(0)
        self.sw, self.device = sw, torch.device(sw.device)
        self.model = build_pixel_model(cfg)
        if reference:
            self.model.ndm.denoiser.net = DiffusersUNet(cfg.data.channels, cfg.data.image_size)
        self.model.to(self.device).train()
        fmt = torch.channels_last if sw.channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        if sw.compile:
            self.model.ndm.denoiser.net = torch.compile(self.model.ndm.denoiser.net)
        c, s = cfg.data.channels, cfg.data.image_size
        self.objective = NELBOObjective(build_loss(cfg.model), c * s * s).to(self.device)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch_size, c, s, s), dtype=torch.uint8, generator=g)
        self.images = images.to(self.device).contiguous(memory_format=fmt)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.generator = torch.Generator(self.device).manual_seed(0)

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.sw.bf16):
            nats, _ = self.objective(self.model, self.images, Noise.from_generator(self.generator, len(self.images),
                                                                                   self.device))
        (nats.mean() * self.objective.loss_scale).backward()
        self.objective.end_step()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self()
        _sync(self.device)
        return time.perf_counter() - t0

    def flops(self) -> int:
        """FLOPs of one step (matmuls and convolutions, forward and backward: torch.utils.flop_counter)."""
        counter = FlopCounterMode(display=False)
        with counter:
            self()
        return counter.get_total_flops()


def peak_memory(config: str, variant: str, batch_size: int, sw: Switches, steps: int = 2,
                table: dict[str, list[str]] | None = None) -> float:
    """Peak memory of training steps in bytes: max allocated on a GPU; on a CPU the peak RSS (VmHWM) of a
    fresh process that builds this variant alone and runs `steps` steps (RSS never falls, so one process
    each; not getrusage's ru_maxrss, which Linux carries over from the forking parent through exec)."""
    if sw.device.startswith("cuda"):
        step = Step(config, variant, batch_size, sw, table=table)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        return float(torch.cuda.max_memory_allocated())
    code = ("import json, sys; from latent_ndm.experiments.benchmark import Step, Switches, malloc; "
            "malloc.keep_freed_memory()\n"
            "a = json.loads(sys.argv[1])\n"
            "s = Step(a['config'], a['variant'], a['batch'], Switches(**a['sw']), table=a['table'])\n"
            "for _ in range(a['steps']): s()\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print(int(hwm.split()[1]) * 1024)")
    arg = json.dumps({"config": config, "variant": variant, "batch": batch_size, "sw": vars(sw), "steps": steps,
                      "table": table})
    out = subprocess.run([sys.executable, "-c", code, arg], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def speed(config: str, batch_size: int, steps: int, rounds: int, variants: list[str] | None = None,
          extra: tuple[str, ...] = (), sw: Switches | None = None, memory: bool = True,
          table: dict[str, list[str]] | None = None, mfu: bool = True) -> dict[str, dict[str, float]]:
    """Training steps of every variant timed in interleaved rounds (median per variant), with FLOPs per step,
    achieved FLOP/s, MFU against the matmul peak measured beside each variant's steps, and peak memory.
    `table` (default VARIANTS) names each variant's config overrides; the first variant is the ratios' base.
    mfu=False skips the matmul peaks (seconds each on a CPU) and the MFU figures: times and FLOPs only."""
    sw = sw or Switches()
    if sw.bf16 and not bf16_fast(sw.device):
        raise RuntimeError(f"--bf16: this {sw.device} has no bf16 kernels (on CPU: no avx512_bf16/AMX), so bf16 "
                           "autocast runs in scalar fallback code; measure bf16 on a machine that has them")
    names = variants or list(VARIANTS)
    states = {name: Step(config, name, batch_size, sw, extra, table) for name in names}
    flops = {name: st.flops() for name, st in states.items()}  # also the warm-up (allocator, first compile)
    for st in states.values():
        st()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    ref, other = ("bf16", "fp32") if sw.bf16 else ("fp32", "bf16")
    # The machine's speed drifts (shared hosts: 2-3x within a minute on some), so each variant's steps are
    # paired with a matmul peak measured just before them, and MFU is the median of step / adjacent peak.
    times: dict[str, list[float]] = {name: [] for name in states}
    mfus: dict[str, list[float]] = {name: [] for name in states}
    peaks = {"fp32": [], "bf16": []} if bf16_fast(sw.device) else {"fp32": []}  # sw.bf16 implies bf16_fast
    peaks = peaks if mfu else {}
    for _ in tqdm(range(rounds), desc="rounds", leave=False):
        if other in peaks:
            peaks[other].append(matmul_peak(dtypes[other], sw.device))
        for name, st in states.items():
            peak_now = matmul_peak(dtypes[ref], sw.device) if mfu else math.nan
            if mfu:
                peaks[ref].append(peak_now)
            for _ in range(steps):
                times[name].append(st.timed())
                mfus[name].append(flops[name] / times[name][-1] / peak_now)
    base_time, base_flops = statistics.median(times[names[0]]), flops[names[0]]
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"sec_per_step": med, "images_per_sec": batch_size / med, "params": states[name].params,
                     "ratio_to_baseline": med / base_time, "gflop_per_step": flops[name] / 1e9,
                     "flop_ratio_to_baseline": flops[name] / base_flops,
                     "time_ratio_over_flop_ratio": (med / base_time) / (flops[name] / base_flops),
                     "achieved_gflops": flops[name] / med / 1e9}
        if mfu:
            out[name][f"mfu_vs_{ref}_peak"] = statistics.median(mfus[name])
    if memory:
        for name in names:
            out[name]["peak_memory_gib"] = peak_memory(config, name, batch_size, sw, table=table) / 2**30
    out["_peaks_gflops"] = {k: statistics.median(v) / 1e9 for k, v in peaks.items()}
    out["_peaks_gflops_max"] = {k: max(v) / 1e9 for k, v in peaks.items()}
    return out


def sampling(config: str, batch_size: int, nfe: int, sw: Switches) -> dict[str, dict[str, float]]:
    """Images per second of every sampler at `nfe` network evaluations per sample (untrained weights: the cost
    does not depend on them; ode_rk45 is adaptive and reports the NFE it took), baseline and NDM continuous."""
    out = {}
    for variant in (BASELINE, "NDM continuous"):
        cfg = load_config(config, VARIANTS[variant])
        torch.manual_seed(0)
        model = build_ndm(cfg.model, cfg.data.channels, cfg.data.image_size).to(sw.device).eval()
        shape = (batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        for name, fn in SAMPLERS.items():
            steps = nfe // 2 if name == "ode_heun" else nfe  # Heun: 2 drift evaluations per step
            with torch.autocast(torch.device(sw.device).type, dtype=torch.bfloat16, enabled=sw.bf16):
                fn(model, shape, torch.Generator(sw.device).manual_seed(0), 2)  # warm-up
                _sync(torch.device(sw.device))
                t0 = time.perf_counter()
                res = fn(model, shape, torch.Generator(sw.device).manual_seed(0), steps)
                _sync(torch.device(sw.device))
            seconds = time.perf_counter() - t0
            out[f"{variant}: {name}"] = {"images_per_sec": batch_size / seconds, "nfe_xhat": res.nfe_xhat,
                                         "nfe_f": res.nfe_f, "seconds": seconds}
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
        timed = speed(config, train_batch, steps=5, rounds=2, variants=[BASELINE, "NDM continuous"],
                      extra=(f"data.shards={tmp}/mnist5k",), memory=False)
    for name, r in timed.items():
        if not name.startswith("_"):
            result["training_images_per_sec"][name] = r["images_per_sec"]
    fastest_training = max(result["training_images_per_sec"].values())
    result["slowest_loader_over_fastest_training"] = min(result["loader_images_per_sec"].values()) / fastest_training
    return result


def main() -> None:
    if sys.argv[1:2] == ["shards"]:  # its own options: latent_ndm/experiments/benchmark_shards.py
        from latent_ndm.experiments.benchmark_shards import main as shards_main

        return shards_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "data", "convs", "shards"])
    p.add_argument("--config", default="configs/bench_cifar_size.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (F stays float32 by design)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser network (not F: forward-mode)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample-nfe", type=int, default=10, help="network evaluations per sample (0: no sampling)")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--variants", default="baseline,discrete,continuous,separable",
                   help="comma-separated, first is the ratios' denominator: baseline, discrete, continuous, "
                        "separable (the time-separable F), and "
                        "reference (diffusers' UNet2DModel as the baseline's network; needs `pip install diffusers`)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", type=Path, default=None, help="also write OUT.json and OUT.md")
    p.add_argument("--images", type=int, default=8192, help="data: images decoded per loader measurement")
    args = p.parse_args()
    unknown = set(args.variants.split(",")) - set(SHORT_NAMES)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(SHORT_NAMES)}")
    kept = malloc.keep_freed_memory()
    if args.what == "data":
        result = data("configs/ndm_mnist.yaml" if args.config.endswith("bench_cifar_size.yaml") else args.config,
                      args.images)
        print(json.dumps({"config": args.config, "threads": torch.get_num_threads(), **result}, indent=2))
        print("\n| what | images/s |\n| --- | --- |")
        for group in ("loader_images_per_sec", "training_images_per_sec"):
            for name, rate in result[group].items():
                print(f"| {'loader' if group.startswith('loader') else 'training'}: {name} | {rate:,.0f} |")
        print(f"\nslowest loader / fastest training: {result['slowest_loader_over_fastest_training']:.0f}x")
        return
    if args.what == "convs":
        result = convs(args.config, args.batch_size, args.device)
        text = convs_markdown(result, args.config, args.batch_size, args.device)
        print(text)
        write_report(args.out, result, text)
        return
    sw = Switches(args.bf16, args.channels_last, args.compile, args.device)
    report = {"config": args.config, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "keep_freed_memory": kept, "mmap_threshold": malloc.mmap_threshold,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "switches": vars(sw),
              "results": speed(args.config, args.batch_size, args.steps, args.rounds,
                               [SHORT_NAMES[v] for v in args.variants.split(",")], sw=sw, memory=not args.no_memory)}
    if args.sample_nfe:
        report |= {"sample_nfe": args.sample_nfe, "sample_batch": args.sample_batch,
                   "sampling": sampling(args.config, args.sample_batch, args.sample_nfe, sw)}
    text = markdown(report)
    print(json.dumps(report, indent=2))
    print("\n" + text)
    write_report(args.out, report, text)


if __name__ == "__main__":
    main()
