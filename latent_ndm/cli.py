"""Command-line entry points behind scripts/*.sh: `python -m latent_ndm.cli {train,evaluate} ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import ConfigError, load_config
from .experiment import load_run, pixel_task
from .train import train


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


def cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="train_ndm.sh", description="Train a pixel-space NDM or its DDPM baseline.")
    p.add_argument("config", help="YAML file with the settings that differ from the defaults")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=500 model.num_steps=10")
    p.add_argument("--allow-config-change", action="store_true", help="resume even if the config changed")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, pixel_task(cfg), allow_config_change=args.allow_config_change)
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.sh", description="Test-set NELBO in bits/dim, per term, as JSON.")
    p.add_argument("run_dir", help="a run directory written by train_ndm.sh")
    p.add_argument("--steps", type=_parse_steps, default=None,
                   help="comma-separated T values and/or 'continuous' (default: the model's own)")
    p.add_argument("--repeats", type=int, default=None, help="draws of (t, eps) per test image")
    p.add_argument("--num-images", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    from .codec import PixelCodec
    from .data import load_split
    from .evaluate import evaluate_nelbo

    cfg, model = load_run(args.run_dir, ema=not args.no_ema)
    images = torch.from_numpy(load_split(cfg.data, "test").images)[: args.num_images]
    steps = args.steps or [model.num_steps if cfg.eval.num_steps is None else cfg.eval.num_steps]
    repeats = args.repeats or cfg.eval.repeats
    report = {"run": str(args.run_dir), "num_images": len(images), "repeats": repeats, "nelbo": {}}
    for T in steps:
        t0 = time.perf_counter()
        res = evaluate_nelbo(model, images, PixelCodec(), T, cfg.eval.batch_size, repeats, cfg.eval.seed, progress=True)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        report["nelbo"]["continuous" if T == 0 else f"T={T}"] = res
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m latent_ndm.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
