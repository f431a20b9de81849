"""Command-line entry points behind scripts/*.sh: `python -m latent_ndm.cli {train,evaluate} ...`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from latent_ndm.evaluation.images import save_grid, save_samples
from latent_ndm.sampling.samplers import SAMPLERS, get_sampler
from latent_ndm.tasks.pixel import pixel_task
from latent_ndm.training.checkpoint import CheckpointError
from latent_ndm.training.loop import TrainingInterrupted, train
from latent_ndm.training.malloc import keep_freed_memory
from latent_ndm.training.runlock import RunLockError

from .config import ConfigError, LatentRunConfig, RunConfig, VAERunConfig, load_config


def _parse_steps(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("continuous", "0", "inf"):
            out.append(0)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number of steps T >= 1 or 'continuous'")
    return out


def _parse_sample_steps(text: str) -> list[int]:
    steps = _parse_steps(text)
    if 0 in steps:
        raise argparse.ArgumentTypeError("sampling steps must be numbers >= 1")
    return steps


def _train_command(argv: list[str], prog: str, description: str, example: str, schema: type,
                   make_task: Callable, keep_group: bool = False) -> int:
    """One training entry point for every stage: config + overrides -> task -> the shared loop."""
    from accelerate import PartialState

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("config", help="YAML file with the settings that differ from the defaults")
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    p.add_argument("--allow-config-change", action="store_true", help="resume even if the config changed")
    args = p.parse_intermixed_args(argv)  # options before or after the overrides
    cfg = load_config(args.config, args.overrides, schema=schema)
    run_dir = train(cfg, make_task(cfg), allow_config_change=args.allow_config_change)
    if PartialState().is_main_process:
        report = run_dir / "test_report.json"
        if report.is_file():
            print(report.read_text())
        print(f"run directory: {run_dir}")
    if not keep_group:
        PartialState().destroy_process_group()
    return 0


def cmd_train(argv: list[str]) -> int:
    return _train_command(argv, "train_ndm.sh", "Train a pixel-space NDM or its DDPM baseline.",
                          "train.steps=500 model.num_steps=10", RunConfig, pixel_task)


def cmd_train_vae(argv: list[str]) -> int:
    from latent_ndm.tasks.vae import vae_task

    return _train_command(argv, "train_vae.sh", "Stage 1: train the VAE (vae/) on shards; exports runs/NAME/vae.",
                          "train.steps=500 vae.latent_channels=4", VAERunConfig, vae_task)


def cmd_train_latent(argv: list[str]) -> int:
    """Stage 2 (run NAME), then stage 3 (run NAME_joint, started from stage 2's EMA weights)."""
    from latent_ndm.tasks.latent import latent_task

    p = argparse.ArgumentParser(prog="train_latent_ndm.sh", description="Stage 2: an NDM prior on the latents "
                                "of a trained VAE (frozen); stage 3: end-to-end fine-tuning of VAE and prior.")
    p.add_argument("config", help="YAML file with the settings that differ from the defaults")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. vae_path=runs/vae_mnist/vae")
    p.add_argument("--stages", default="prior,joint", help="prior (stage 2), joint (stage 3), or both (default)")
    p.add_argument("--joint-steps", type=int, default=None, help="stage 3 steps (default: a quarter of train.steps)")
    p.add_argument("--joint-lr", type=float, default=None, help="stage 3 prior learning rate (default: train.lr / 10)")
    p.add_argument("--allow-config-change", action="store_true", help="resume even if the config changed")
    args = p.parse_intermixed_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or set(stages) - {"prior", "joint"}:
        raise ValueError(f"--stages {args.stages!r}: use prior, joint or prior,joint")
    cfg = load_config(args.config, args.overrides, schema=LatentRunConfig)
    runs = []
    if "prior" in stages:
        runs.append(_train_command([args.config, *args.overrides, "stage=prior"]
                                   + (["--allow-config-change"] if args.allow_config_change else []),
                                   "train_latent_ndm.sh", "", "", LatentRunConfig, latent_task, keep_group=True))
    if "joint" in stages:
        stage2 = Path(cfg.out_dir) / cfg.name
        # Stage 3 trains the encoder, so it always encodes on the fly (latents= clears pre-encoded ones).
        joint = [f"name={cfg.name}_joint", "stage=joint", f"init_from={stage2}", "latents=",
                 f"train.steps={args.joint_steps or max(1, cfg.train.steps // 4)}",
                 f"train.lr={args.joint_lr or cfg.train.lr / 10}"]
        runs.append(_train_command([args.config, *args.overrides, *joint]
                                   + (["--allow-config-change"] if args.allow_config_change else []),
                                   "train_latent_ndm.sh", "", "", LatentRunConfig, latent_task))
    return max(runs)


def cmd_encode_latents(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="encode_latents.sh", description="Stage 2 data: the frozen VAE's posterior "
                                "(mean and log-variance of the normalised latents) of every train image, as shards "
                                "that train_latent_ndm.sh reads with latents=OUT_DIR.")
    p.add_argument("vae_dir", help="a saved VAE (train_vae.sh exports runs/NAME/vae)")
    p.add_argument("shards_dir", help="the image shards (make_shards.sh) whose train split to encode")
    p.add_argument("out_dir", help="where to write train-NNNNNN.tar and manifest.json")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder call")
    p.add_argument("--device", default="auto", help=DEVICE_HELP.split(";")[0])
    args = p.parse_args(argv)
    from latent_ndm.data.latent_shards import encode_latents
    from latent_ndm.runtime import announce, resolve_device

    device = resolve_device(args.device)
    announce("encode_latents", device, 1)
    t0 = time.perf_counter()
    manifest = encode_latents(args.vae_dir, args.shards_dir, args.out_dir, args.batch_size, device, progress=True)
    train = manifest["splits"]["train"]
    print(json.dumps({"out_dir": args.out_dir, "count": train["count"], "shards": len(train["shards"]),
                      "latent_shape": manifest["latent_shape"], "vae": manifest["vae"],
                      "seconds": round(time.perf_counter() - t0, 2)}, indent=2))
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.sh", description="Test-set NELBO and ODE NLL in bits/dim, as JSON "
                                "(latent models: the full model's bound in bits per image dimension); sample "
                                "quality (FD-MNIST, FID) at several numbers of sampling steps.")
    p.add_argument("path", help="a run directory (train_ndm.sh, train_latent_ndm.sh) or a saved model directory")
    p.add_argument("--metrics", default="nelbo", help="comma-separated: nelbo, ode_nll, fd_mnist, fid, kid (default: "
                   "nelbo). fid, kid: --num-samples samples (default 50,000) against the training images' Inception "
                   "statistics (computed once, cached beside the shards), with the local Inception weights file; "
                   "fd_mnist: Frechet distance to the test images in the features of the project's MNIST "
                   "classifier (--classifier; NOT FID; 500 samples by default)")
    p.add_argument("--steps", type=_parse_steps, default=_parse_steps("10,100,1000,continuous"),
                   help="NELBO at these T values and/or 'continuous' (default: 10,100,1000,continuous)")
    p.add_argument("--repeats", type=int, default=None, help="draws of (t, eps) per test image for the NELBO")
    p.add_argument("--num-images", type=int, default=None,
                   help="N evenly spaced test images for the NELBO (default: all)")
    p.add_argument("--ode-images", type=int, default=100,
                   help="N evenly spaced test images for the ODE NLL (slow; default 100). Latent models: the "
                        "bound with the prior's ODE NLL in place of its NELBO")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per image for the ODE NLL")
    p.add_argument("--rtol", type=float, default=1e-5, help="RK45 relative tolerance for the ODE NLL")
    p.add_argument("--atol", type=float, default=1e-5, help="RK45 absolute tolerance for the ODE NLL")
    p.add_argument("--classifier", default="runs/mnist_classifier",
                   help="fd_mnist: the classifier directory (default runs/mnist_classifier: train_classifier.sh)")
    p.add_argument("--inception-weights", default=None,
                   help="fid: the local file weights-inception-2015-12-05-6726825d.pth (default: "
                        "$LATENT_NDM_INCEPTION_WEIGHTS); never downloaded")
    p.add_argument("--sample-steps", type=_parse_sample_steps, default=[10, 100, 1000],
                   help="fd_mnist / fid: sampling steps to compare (default: 10,100,1000)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="fd_mnist / fid / kid: samples per setting (default 50,000 with fid or kid, else 500)")
    p.add_argument("--sampler", default="ancestral", help=f"fd_mnist / fid: one of {', '.join(SAMPLERS)}")
    p.add_argument("--seed", type=int, default=0, help="fd_mnist / fid: seed of the sampling noise (every setting)")
    p.add_argument("--temperature", type=float, default=1.0, help="fd_mnist / fid: " + TEMPERATURE_HELP)
    p.add_argument("--guide", default=None, help="fd_mnist / fid: " + GUIDE_HELP)
    p.add_argument("--guidance", type=float, default=None, help="fd_mnist / fid: " + GUIDANCE_HELP)
    p.add_argument("--sample-batch-size", type=int, default=256, help="fd_mnist / fid: samples per sampler call")
    p.add_argument("--save-samples", type=Path, default=None, help="fd_mnist / fid: also write each setting's "
                   "samples here as a PNG grid and .npz (as sample.sh names them)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--shards", default=None, help="test shards to read (default: the run's data.shards)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-tf32", action="store_true", help="no TF32 anywhere (F and the bound never use it; this "
                   "also keeps the denoiser and the VAE in full float32 on Ampere+ GPUs)")
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = set(metrics) - {"nelbo", "ode_nll", "fd_mnist", "fid", "kid"}
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from nelbo, ode_nll, fd_mnist, fid, kid")
    quality = [m for m in metrics if m in ("fd_mnist", "fid", "kid")]
    if quality:
        get_sampler(args.sampler)
        if {"fid", "kid"} & set(quality):  # fail before any other work when the file is missing
            from latent_ndm.evaluation.quality import inception_weights_path

            inception_weights_path(args.inception_weights)
    from latent_ndm.data.shards import dataset_version
    from latent_ndm.data.streams import eval_examples, open_split
    from latent_ndm.runtime import allow_tf32, announce

    from .pipeline import load_pipeline

    guidance = _guidance(args)
    if args.guide is not None and not quality:
        raise ValueError("--guide steers sampling: it applies to the sample-quality metrics (fd_mnist, fid, kid)")
    device, rank, world = _start("evaluate", args.device)
    pipe = load_pipeline(args.path, ema=not args.no_ema, device=device)
    guide = None if args.guide is None else load_pipeline(args.guide, ema=not args.no_ema, device=device)
    cfg = _run_config(pipe, args.path)
    allow_tf32(cfg.train.tf32 and not args.no_tf32)
    announce("evaluate", device, world, rank)
    if args.shards:
        cfg.data.shards, cfg.data.test_urls = args.shards, ""
    repeats = args.repeats or cfg.eval.repeats
    report: dict = {"path": str(args.path), "shards": cfg.data.shards,
                    "test_images": open_split(cfg.data, "test").count, "device": str(device), "processes": world}
    if version := dataset_version(cfg.data.shards):  # e.g. which downsampled ImageNet: figures differ between them
        report["dataset_version"] = version
    # Evenly spaced subsets, not the first n: test sets are often sorted by class (the MNIST subset is).
    if "nelbo" in metrics:
        # Under torchrun each process reads and evaluates its share; the terms are gathered (each image once).
        images, ids, bad = eval_examples(cfg.data, "test", args.num_images)
        report["nelbo"] = {"repeats": repeats, "skipped_unreadable": bad}
        for T in args.steps:
            t0 = time.perf_counter()
            res = pipe.nelbo_bpd(images, T, repeats, cfg.eval.seed, ids=ids, batch_size=cfg.eval.batch_size,
                                 progress=rank == 0, distributed=world > 1)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            report["nelbo"]["continuous" if T == 0 else f"T={T}"] = res
            report["nelbo"]["num_images"] = res["num_images"]  # over all processes
    if "ode_nll" in metrics:
        images, ids, _ = eval_examples(cfg.data, "test", args.ode_images)
        # Each image's draws (its dequantisation, a latent model's z0, the probes) are keyed by its id.
        report["ode_nll"] = pipe.ode_nll_bpd(images, args.probes, args.rtol, args.atol, cfg.eval.seed, ids=ids,
                                             progress=rank == 0, distributed=world > 1)
    if quality:
        from latent_ndm.evaluation.quality import sample_quality

        report["sample_quality"] = sample_quality(
            pipe, args.classifier if "fd_mnist" in quality else None, args.sample_steps, args.num_samples,
            args.sampler, args.seed, quality, args.inception_weights, args.sample_batch_size, progress=rank == 0,
            on_images=None if args.save_samples is None or rank != 0 else
            lambda steps, images, nfe: save_samples(images, args.save_samples, args.sampler, steps, args.seed,
                                                    args.temperature, guidance, **nfe),
            temperature=args.temperature, guide=guide, guidance=1.0 if guidance is None else guidance)
        if guide is not None:
            report["sample_quality"]["guide"] = str(args.guide)
    if rank != 0:
        return 0
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def cmd_train_classifier(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="train_classifier.sh", description="Train the small image classifier whose "
                                "penultimate features define FD-MNIST (evaluate.sh --metrics fd_mnist; not FID) on "
                                "the labelled train split of shards; saves config.json + model.safetensors + "
                                "report.json and prints its test accuracy.")
    p.add_argument("--shards", default="data/mnist5k", help="shard folder (default data/mnist5k: make_shards.sh)")
    p.add_argument("--out", default="runs/mnist_classifier", help="output directory (default runs/mnist_classifier)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle, cosine decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="decoding processes (default 0: decode in this process, "
                   "a few ms per batch)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the network is small, and on "
                   "a busy 2-core machine 2 threads plus decoding ran 7x slower; 0: torch's own choice)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from latent_ndm.evaluation.classifier import train_classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    _, report = train_classifier(args.shards, args.out, args.steps, args.batch_size, args.lr, seed=args.seed,
                                 num_workers=args.num_workers, device=args.device)
    print(json.dumps(report, indent=2))
    return 0


def _guidance(args: argparse.Namespace) -> float | None:
    """The autoguidance weight of --guide / --guidance (None: no guide), checked before any model loads."""
    if args.guide is None:
        if args.guidance is not None:
            raise ValueError("--guidance needs --guide (the weaker model to steer away from)")
        return None
    weight = 2.0 if args.guidance is None else args.guidance
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"--guidance must be a finite number >= 0 (1: no guidance), got {weight}")
    return weight


def cmd_sample(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sample.sh", description="Samples from a trained model (pixel or latent) as a "
                                "PNG grid and .npz.")
    p.add_argument("path", help="a run directory (train_ndm.sh, train_latent_ndm.sh) or a saved model directory")
    p.add_argument("--num", "-n", type=int, default=64, help="number of samples")
    p.add_argument("--sampler", default="ancestral", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: T, or 100 in continuous time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help=TEMPERATURE_HELP)
    p.add_argument("--guide", default=None, help=GUIDE_HELP)
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: PATH/samples)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = p.parse_args(argv)
    from latent_ndm.runtime import allow_tf32, announce

    from .pipeline import load_pipeline

    get_sampler(args.sampler)  # a clear error for a wrong name before loading anything
    guidance = _guidance(args)
    device, rank, world = _start("sample", args.device)
    pipe = load_pipeline(args.path, ema=not args.no_ema, device=device)
    guide = None if args.guide is None else load_pipeline(args.guide, ema=not args.no_ema, device=device)
    allow_tf32(pipe.config.train.tf32 if pipe.config is not None else True)
    announce("sample", device, world, rank)
    out = args.out or Path(args.path) / "samples"
    t0 = time.perf_counter()
    # Batch j draws from a generator keyed by (seed, j): the same images for any number of processes.
    images = pipe.sample(args.num, args.sampler, args.steps, None, args.batch_size, seed=args.seed,
                         temperature=args.temperature, guide=guide, guidance=1.0 if guidance is None else guidance)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return 0
    files = save_samples(images, out, args.sampler, args.steps, args.seed, args.temperature, guidance,
                         **pipe.last_nfe)
    print(json.dumps({**files, "temperature": args.temperature, "guide": args.guide, "guidance": guidance,
                      "seconds": round(seconds, 2),
                      "seconds_per_image": seconds / args.num, "processes": world, "device": str(device),
                      **pipe.last_nfe}, indent=2))
    return 0


def cmd_pictures(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="visualize.sh",
                                description="F(x, t) of test images at t = 0..1, and denoising trajectories.")
    p.add_argument("path", help="a run directory (train_ndm.sh) or a saved model directory")
    p.add_argument("--num", "-n", type=int, default=8, help="test images / samples (rows)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps of the trajectories")
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", default=None, help="test shards to read (default: the run's data.shards)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: PATH/pictures)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP.split(";")[0])
    args = p.parse_args(argv)
    from latent_ndm.data.shards import read_split
    from latent_ndm.evaluation.pictures import TIMES, trajectory_rows, transform_rows
    from latent_ndm.runtime import announce, resolve_device

    from .pipeline import NDMPipeline

    device = resolve_device(args.device)
    announce("pictures", device, 1)
    pipe = NDMPipeline.from_pretrained(args.path, device=device)
    out = args.out or Path(args.path) / "pictures"
    data = _run_config(pipe, args.path).data
    test = read_split(args.shards or data.shards, "test", data.strict)
    # One test image from each of the first classes, so rows differ.
    pick = [int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)][: args.num]
    rows, diff, scale = transform_rows(pipe.model, torch.from_numpy(test.images[pick]))
    save_grid(rows, out / "transform.png", nrow=len(TIMES))
    save_grid(diff, out / "transform_diff.png", nrow=len(TIMES))
    traj = trajectory_rows(pipe.model, args.num, args.steps, 8, args.sampler, torch.Generator().manual_seed(args.seed))
    save_grid(traj, out / "trajectories.png", nrow=8)
    print(json.dumps({"transform": str(out / "transform.png"), "times": TIMES,
                      "transform_diff": str(out / "transform_diff.png"), "diff_scale_max_abs": scale,
                      "trajectories": str(out / "trajectories.png")}, indent=2))
    return 0


TEMPERATURE_HELP = ("the sampling noise's scale at t = 1, z_1 ~ N(0, T^2 I) (default 1; e.g. 0.8: cleaner, less "
                    "diverse samples from the deterministic samplers; likelihoods never depend on it)")
GUIDE_HELP = ("autoguidance: a weaker model of the same space (a run, a saved model, or an early checkpoint of the "
              "run, RUN/checkpoints/step_N) that the samples are steered away from, xhat = xhat_guide + W (xhat - "
              "xhat_guide); cleaner, somewhat less diverse samples at twice the denoiser evaluations")
GUIDANCE_HELP = "autoguidance: the weight W (default 2 with --guide; 1 = the model alone; needs --guide)"
DEVICE_HELP = ("cuda, cuda:N, cpu, or auto (the default: cuda when available); under torchrun / accelerate launch "
               "each process takes the GPU of its LOCAL_RANK")


def _start(command: str, device_name: str) -> tuple[torch.device, int, int]:
    """(device, rank, world) of a command: the device resolved (a clear error when CUDA is asked for but
    unusable), the process group started under torchrun; then the one line saying where it runs."""
    from latent_ndm.runtime import local_device, resolve_device, start_processes

    device = resolve_device(device_name)
    rank, world = start_processes(device)
    return local_device(device), rank, world


def _run_config(pipe, path):
    if pipe.config is None:
        raise ValueError(f"{path} holds no run.json (the config the model was trained with): its test data and "
                         "evaluation settings are unknown; save the model with NDMPipeline(model, shape, config)")
    return pipe.config


COMMANDS = {"train": cmd_train, "train_vae": cmd_train_vae, "train_latent": cmd_train_latent,
            "encode_latents": cmd_encode_latents, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "pictures": cmd_pictures, "train_classifier": cmd_train_classifier}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # torch 2.14 warns from inside its own forward-AD decompositions on first use; not actionable here.
    warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated")
    keep_freed_memory()
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m latent_ndm.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except TrainingInterrupted as e:  # SIGTERM/SIGINT: checkpointed, resumable; the shell's exit code for it
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, CheckpointError, FloatingPointError, ModuleNotFoundError, OSError, ValueError,
            RunLockError) as e:
        # One readable line for what users can fix (bad config, data, paths, a full disk); no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
