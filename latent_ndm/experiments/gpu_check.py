"""One prepared check of a GPU machine (scripts/gpu_check.sh), a few minutes on one H100/H200.

`python -m latent_ndm.experiments.gpu_check [--device cuda] [--quick] [--no-compile] [--out docs/bench/gpu_check]`:
1. the NELBO of a fixed batch (fixed weights, fixed draws of t, eps_0, eps made on the CPU) on the device
   in float32 with TF32 off, against the same on the CPU: the largest relative difference of the
   per-example bound, which must stay below TOLERANCE;
2. training steps of the pixel CIFAR-size baseline (F = identity) and NDM (continuous), in bf16 (float32
   where the device has no bf16 kernels), eager and compiled: images/s, FLOPs per step, MFU against the
   matmul peak measured in the same run, the NDM/baseline time ratio over their FLOP ratio, peak memory
   (latent_ndm.experiments.benchmark.speed);
3. training steps of the latent model (the paper-scale VAE + latent NDM configs, fresh weights), eager and
   compiled: images/s and MFU;
4. sampling images/s of every sampler at 10 network evaluations.
`--quick` shrinks everything (tiny networks, batch 4, one round) so that it runs on a CPU in about a
minute (the test suite runs it); its figures are not measurements.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from latent_ndm.config import LatentRunConfig, VAERunConfig, load_config
from latent_ndm.core.codec import LatentCodec
from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.model import ImageModel
from latent_ndm.core.noise import Noise, keyed_generator
from latent_ndm.experiments.benchmark import BASELINE, Switches, sampling, speed
from latent_ndm.experiments.benchmark_convs import _sync, matmul_peak
from latent_ndm.nets.build import build_ndm
from latent_ndm.runtime import allow_tf32, describe, resolve_device
from latent_ndm.tasks.pixel import build_pixel_model
from latent_ndm.training.guards import bf16_fast
from vae.model import VAE

TOLERANCE = 1e-4  # relative, per example: float32 on two devices (different kernels, summation orders)
TINY = ("model.denoiser.size=tiny", "model.transform_net.size=tiny")


def nelbo_device_vs_cpu(device: torch.device, quick: bool) -> dict:
    """The per-example NELBO (nats) of one fixed batch on the CPU and on `device`, float32, TF32 off."""
    overrides = list(TINY) if quick else []
    cfg = load_config("configs/bench_cifar_size.yaml", ["model.num_steps=0", *overrides])
    torch.manual_seed(0)
    model = build_pixel_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    n, shape = 4 if quick else 16, (3, cfg.data.image_size, cfg.data.image_size)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    eps_0, eps = torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)

    def bound(m: ImageModel, dev: torch.device) -> torch.Tensor:
        with torch.no_grad():
            x = m.codec.encode_mean(images.to(dev))  # pixels: the bin centres in [-1, 1]
            terms = m.ndm(x, t.to(dev), eps_0.to(dev), eps.to(dev), 0)
        return sum(v.double() for v in terms.values()).cpu()

    allow_tf32(False)
    try:
        on_cpu = bound(model, torch.device("cpu"))
        on_device = bound(model.to(device), device)
    finally:
        allow_tf32(True)
    rel = ((on_device - on_cpu).abs() / on_cpu.abs()).max().item()
    return {"examples": n, "cpu_nats_mean": on_cpu.mean().item(), "device_nats_mean": on_device.mean().item(),
            "max_relative_difference": rel, "tolerance": TOLERANCE, "ok": rel <= TOLERANCE}


def latent_steps(device: torch.device, bf16: bool, compiled: bool, quick: bool) -> dict:
    """Training steps of the latent model (VAE + NDM prior, end to end): images/s, FLOPs, MFU."""
    vae_cfg = load_config("configs/vae_mnist.yaml" if quick else "configs/vae_cifar10.yaml", schema=VAERunConfig)
    cfg = load_config("configs/latent_ndm_mnist.yaml" if quick else "configs/latent_ndm_cifar10.yaml",
                      list(TINY) if quick else [], schema=LatentRunConfig)
    torch.manual_seed(0)
    vae = VAE(vae_cfg.vae)
    c, h, _ = vae.latent_shape(cfg.data.image_size)
    model = ImageModel(LatentCodec(vae, frozen=False), build_ndm(cfg.model, c, h)).to(device).train()
    if compiled:
        model.ndm.denoiser.net.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = NDMLoss().to(device)
    batch = 4 if quick else 64
    images = torch.randint(0, 256, (batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                           generator=torch.Generator().manual_seed(0), dtype=torch.uint8).to(device)

    def step(k: int) -> None:
        noise = Noise([keyed_generator(device, 0, "gpu-check", k)], [batch])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = model.nelbo_terms(images, noise, loss_fn)
        sum(terms.values()).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step(0)
    step(1)  # warm-up (a compiled model compiles on the first steps)
    times = []
    for k in range(1 if quick else 5):
        _sync(device)
        t0 = time.perf_counter()
        step(2 + k)
        _sync(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32, str(device))
    flops = counter.get_total_flops()
    return {"sec_per_step": sec, "images_per_sec": batch / sec, "gflop_per_step": flops / 1e9,
            "mfu": flops / sec / peak, "batch_size": batch}


def run(device_name: str = "auto", quick: bool = False, compile_: bool = True) -> dict:
    device = resolve_device(device_name)
    allow_tf32(True)
    bf16 = bf16_fast(str(device))
    report: dict = {"device": describe(device, 1, bf16), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "precision": "bf16 autocast" if bf16 else "float32 (no bf16 kernels)", "quick": quick}
    t_start = time.perf_counter()
    report["nelbo_device_vs_cpu"] = nelbo_device_vs_cpu(device, quick)
    batch, steps, rounds = (4, 1, 1) if quick else (128, 3, 3)
    extra = TINY if quick else ()
    modes = [("eager", False)] + ([("compiled", True)] if compile_ else [])
    report["pixel_training"], report["latent_training"] = {}, {}
    for mode, compiled in modes:
        sw = Switches(bf16=bf16, compile=compiled, device=str(device))
        report["pixel_training"][mode] = speed("configs/bench_cifar_size.yaml", batch, steps, rounds,
                                               [BASELINE, "NDM continuous"], extra, sw, memory=True)
        report["latent_training"][mode] = latent_steps(device, bf16, compiled, quick)
    cfg = "configs/bench_cifar_size.yaml"
    report["sampling"] = sampling(cfg, batch, 10, Switches(bf16=bf16, device=str(device))) if not quick else \
        _quick_sampling(device)
    report["seconds"] = time.perf_counter() - t_start
    return report


def _quick_sampling(device: torch.device) -> dict:
    cfg = load_config("configs/bench_cifar_size.yaml", list(TINY))
    ndm = build_ndm(cfg.model, 3, 32).to(device).eval()
    from latent_ndm.sampling.samplers import ancestral

    t0 = time.perf_counter()
    ancestral(ndm, (4, 3, 32, 32), torch.Generator(device).manual_seed(0), 2)
    return {"NDM continuous: ancestral": {"images_per_sec": 4 / (time.perf_counter() - t0), "nfe_xhat": 2}}


def markdown(r: dict) -> str:
    nelbo = r["nelbo_device_vs_cpu"]
    lines = [f"gpu_check: {r['device']}, torch {r['torch']} (CUDA {r['cuda']}), {r['precision']}"
             + (" -- QUICK: not a measurement" if r["quick"] else ""), "",
             f"NELBO of a fixed batch, device vs CPU (float32, TF32 off): max relative difference "
             f"{nelbo['max_relative_difference']:.2e} (tolerance {nelbo['tolerance']:.0e}): "
             f"{'OK' if nelbo['ok'] else 'FAILED'}", "",
             "| training | mode | images/s | GFLOP/step | MFU | time ratio / FLOP ratio | peak memory GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, res in r["pixel_training"].items():
        for name, row in res.items():
            if name.startswith("_"):
                continue
            mfu = next(v for k, v in row.items() if k.startswith("mfu_vs_"))
            lines.append(f"| pixel {name} | {mode} | {row['images_per_sec']:,.1f} | {row['gflop_per_step']:.1f} | "
                         f"{mfu:.0%} | {row['time_ratio_over_flop_ratio']:.2f} | {row.get('peak_memory_gib', 0):.2f} |")
    for mode, row in r["latent_training"].items():
        lines.append(f"| latent (VAE + NDM, end to end) | {mode} | {row['images_per_sec']:,.1f} | "
                     f"{row['gflop_per_step']:.1f} | {row['mfu']:.0%} | | |")
    lines += ["", "| sampling | images/s | NFE (xhat) |", "| --- | --- | --- |"]
    for name, row in r["sampling"].items():
        lines.append(f"| {name} | {row['images_per_sec']:,.1f} | {row['nfe_xhat']} |")
    lines.append(f"\ntotal {r['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda (the default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke run (not a measurement)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--out", type=Path, default=None, help="also write OUT.json and OUT.md")
    args = p.parse_args(argv)
    report = run(args.device, args.quick, not args.no_compile)
    text = markdown(report)
    print(json.dumps(report, indent=2, default=str))
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0 if report["nelbo_device_vs_cpu"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
