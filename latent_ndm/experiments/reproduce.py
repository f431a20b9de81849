"""Reproduction at CPU scale of the NDM paper's claim: with the same denoiser, the same data and the same
number of training steps, NDM's NELBO is lower than its F = identity baseline's, most of all at small T.

    python -m latent_ndm.experiments.reproduce [--steps 600] [--seeds 0,1] [--out runs/reproduce]
        [--report docs/reproduce]
    python -m latent_ndm.experiments.reproduce compute [...]   (the compute-matched comparison:
        latent_ndm/experiments/compute_matched.py)

Four models per seed, all from configs/ndm_mnist.yaml (the same "mnist" U-Net as denoiser; NDM adds
the same U-Net inside F): baseline and NDM, each trained on the T = 10 discrete bound and in continuous
time. Each is trained by the ordinary CLI in its own process (the exact commands go into the report),
then evaluated here on all test images: the NELBO at T = 10, 100, 1000 and continuous time (noise
keyed by image, so NDM and baseline see the same draws and their paired difference has a small
standard error), the ODE NLL of the continuous-time models on evenly spaced test images (NFE and
seconds reported; a T = 10 model is trained only at t = i/10, so its ODE is not its model), and, when a
classifier directory exists (scripts/train_classifier.sh), FD-MNIST of ancestral samples at 10, 100
and 1000 steps (a discrete model samples its own 10 steps only).

Writes REPORT/reproduce.{md,csv,json} and REPORT/bpd_vs_step.png (test bits/dim of the periodic
evaluation, at each model's own T, against the training step). Re-running reuses finished runs and
cached evaluations (REPORT/... are always rewritten).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {  # name -> overrides of configs/ndm_mnist.yaml
    "baseline T=10": ["model.transform=identity", "model.num_steps=10"],
    "NDM T=10": ["model.transform=neural", "model.num_steps=10"],
    "baseline continuous": ["model.transform=identity", "model.num_steps=0"],
    "NDM continuous": ["model.transform=neural", "model.num_steps=0"],
}
EVAL_T = (10, 100, 1000, 0)  # 0 = continuous time
CONFIG = "configs/ndm_mnist.yaml"


def _t_name(T: int) -> str:
    return "continuous" if T == 0 else f"T={T}"


def run_name(model: str, seed: int) -> str:
    return f"{model.replace(' ', '_').replace('=', '')}_seed{seed}"


def train_command(args: argparse.Namespace, model: str, seed: int) -> list[str]:
    steps = args.steps
    return [sys.executable, "-m", "latent_ndm.cli", "train", CONFIG, *MODELS[model], f"name={run_name(model, seed)}",
            f"out_dir={args.out}", f"data.shards={args.shards}", f"train.seed={seed}", f"train.steps={steps}",
            f"train.batch_size={args.batch_size}", f"train.eval_every={args.eval_every}",
            f"train.eval_examples={args.eval_examples}", f"train.sample_every={steps}", f"train.ckpt_every={steps}"]


def evaluate_run(run_dir: Path, args: argparse.Namespace) -> dict:
    """NELBO at EVAL_T (with per-image totals for paired differences), ODE NLL, FD-MNIST; cached in the run."""
    from latent_ndm.core.process import bits_per_dim
    from latent_ndm.data.streams import eval_examples
    from latent_ndm.evaluation.nelbo import nelbo_per_example
    from latent_ndm.pipeline import NDMPipeline

    pipe = NDMPipeline.from_pretrained(run_dir)
    # A T = 10 model's F and xhat are trained only at t = i/10: its probability-flow ODE is not its model.
    ode_images = args.ode_images if pipe.ndm.num_steps == 0 else 0
    settings = {"ode_images": ode_images, "fd_samples": args.fd_samples, "eval_T": list(EVAL_T),
                "classifier": args.classifier if Path(args.classifier).is_dir() else None}
    cache = run_dir / "reproduce_eval.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("settings") == settings:
            return cached
    images, ids, _ = eval_examples(pipe.config.data, "test", None, 0, 1)
    dims = images[0].numel()
    out: dict = {"settings": settings, "nelbo": {}, "per_image_bpd": {}}
    for T in EVAL_T:
        t0 = time.perf_counter()
        terms = nelbo_per_example(pipe.model, images, ids, T, seed=pipe.config.eval.seed)
        bpd = bits_per_dim(sum(terms.values()), dims)
        out["nelbo"][_t_name(T)] = {"bpd": bpd.mean().item(), "stderr": bpd.std().item() / math.sqrt(len(bpd)),
                                    **{f"{k}_bpd": bits_per_dim(v, dims).mean().item() for k, v in terms.items()},
                                    "seconds": round(time.perf_counter() - t0, 2)}
        out["per_image_bpd"][_t_name(T)] = bpd.tolist()
    if ode_images:
        ode_images = eval_examples(pipe.config.data, "test", ode_images, 0, 1)
        ode_images, ode_ids, _ = ode_images
        out["ode_nll"] = pipe.ode_nll_bpd(ode_images, seed=pipe.config.eval.seed, ids=ode_ids, progress=True)
    if settings["classifier"] and args.fd_samples:
        from latent_ndm.evaluation.quality import sample_quality

        out["fd_mnist"] = sample_quality(pipe, args.classifier, (10, 100, 1000), args.fd_samples, "ancestral", 0)
    cache.write_text(json.dumps(out, indent=2))
    return out


def test_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["test_bpd"]) for r in rows if "test_bpd" in r]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of a - b over the same images."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return d.mean().item(), d.std().item() / math.sqrt(len(d))


def write_report(args: argparse.Namespace, results: dict, commands: dict, seconds: dict) -> None:
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    header = ["model", "seed", "train_seconds", *[f"nelbo_{_t_name(T)}" for T in EVAL_T],
              *[f"stderr_{_t_name(T)}" for T in EVAL_T], "ode_nll", "ode_nll_stderr", "ode_nfe",
              "fd_mnist_10", "fd_mnist_100", "fd_mnist_1000"]
    rows = []
    for (model, seed), r in results.items():
        fd = r.get("fd_mnist", {}).get("steps", {})
        ode = r.get("ode_nll", {})
        rows.append([model, seed, seconds.get((model, seed)),
                     *[r["nelbo"][_t_name(T)]["bpd"] for T in EVAL_T],
                     *[r["nelbo"][_t_name(T)]["stderr"] for T in EVAL_T],
                     ode.get("bpd"), ode.get("bpd_stderr"), ode.get("nfe_mean"),
                     *[fd.get(str(n), {}).get("fd_mnist") for n in (10, 100, 1000)]])
    with open(report / "reproduce.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])

    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# NDM vs baseline on MNIST ({args.steps} training steps, batch {args.batch_size}, seeds {args.seeds})",
             "", "Test NELBO in bits/dim on all test images (± standard error over images); ODE NLL on "
             f"{args.ode_images} evenly spaced test images; FD-MNIST (Frechet distance in the project's MNIST "
             f"classifier features, not FID) of {args.fd_samples} ancestral samples against the test images.", "",
             "| model | seed | " + " | ".join(f"NELBO {_t_name(T)}" for T in EVAL_T)
             + " | ODE NLL (NFE) | FD-MNIST 10 / 100 / 1000 steps | train s |",
             "|" + " --- |" * (len(EVAL_T) + 5)]
    for row in rows:
        model, seed, secs = row[:3]
        nelbo = [f"{fmt(row[3 + i])} ± {fmt(row[3 + len(EVAL_T) + i])}" for i in range(len(EVAL_T))]
        ode = "-" if row[-6] is None else f"{fmt(row[-6])} ± {fmt(row[-5])} ({row[-4]:.0f})"
        fd = " / ".join(fmt(v, 2) for v in row[-3:])
        lines.append(f"| {model} | {seed} | " + " | ".join(nelbo) + f" | {ode} | {fd} | {fmt(secs, 0)} |")
    lines += ["", "## NDM minus baseline (paired over the same test images and noise; negative = NDM better)", "",
              "| trained with | seed | " + " | ".join(f"Δ NELBO {_t_name(T)}" for T in EVAL_T) + " |",
              "|" + " --- |" * (len(EVAL_T) + 2)]
    for kind in ("T=10", "continuous"):
        for seed in args.seeds:
            a, b = results.get((f"NDM {kind}", seed)), results.get((f"baseline {kind}", seed))
            if a is None or b is None:
                continue
            cells = []
            for T in EVAL_T:
                m, se = paired(a["per_image_bpd"][_t_name(T)], b["per_image_bpd"][_t_name(T)])
                cells.append(f"{m:+.3f} ± {se:.3f}")
            lines.append(f"| {kind} | {seed} | " + " | ".join(cells) + " |")
    fd_ref = next((r["fd_mnist"]["reference"] for r in results.values() if "fd_mnist" in r), None)
    if fd_ref:
        lines += ["", f"FD-MNIST floor (train images vs test images, {fd_ref['train_images']} vs "
                      f"{fd_ref['test_images']}): {fd_ref['fd_mnist_train_vs_test']:.2f}"]
    lines += ["", "![test bits/dim against training step](bpd_vs_step.png)", "", "## Commands", "",
              f"    python -m latent_ndm.experiments.reproduce {' '.join(shlex.quote(a) for a in sys.argv[1:])}", "",
              "Each model was trained by:", ""]
    lines += [f"    {shlex.join(['python', *cmd[1:]])}" for cmd in commands.values()]
    (report / "reproduce.md").write_text("\n".join(lines) + "\n")
    (report / "reproduce.json").write_text(json.dumps(
        {f"{m} seed{s}": {k: v for k, v in r.items() if k != "per_image_bpd"} for (m, s), r in results.items()},
        indent=2))
    plot_curves(args, list(results), report / "bpd_vs_step.png")


def plot_curves(args: argparse.Namespace, runs: list[tuple[str, int]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # matplotlib comes with the data extra (mlxtend)
        raise RuntimeError("the plot needs matplotlib: pip install 'latent-ndm[data]'") from e
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {"baseline T=10": "tab:blue", "NDM T=10": "tab:red", "baseline continuous": "tab:cyan",
               "NDM continuous": "tab:orange"}
    labelled = set()
    for model, seed in runs:
        curve = test_curve(Path(args.out) / run_name(model, seed))
        if curve:
            ax.plot(*zip(*curve), color=colours[model], marker="o", ms=3, label=None if model in labelled else model,
                    linestyle="--" if "T=10" in model else "-")
            labelled.add(model)
    ax.set_xlabel("training step")
    ax.set_ylabel("test NELBO, bits/dim (model's own T)")
    ax.set_title(f"MNIST subset, {args.eval_examples} test images")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compute"]:  # its own options: latent_ndm/experiments/compute_matched.py
        from latent_ndm.experiments.compute_matched import main as compute_main

        return compute_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps of every model")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}")
    p.add_argument("--eval-every", type=int, default=100, help="periodic test evaluation for the plot")
    p.add_argument("--eval-examples", type=int, default=500, help="test images of the periodic evaluation")
    p.add_argument("--ode-images", type=int, default=20, help="test images for the ODE NLL (0: skip)")
    p.add_argument("--fd-samples", type=int, default=500, help="samples for FD-MNIST per setting (0: skip)")
    p.add_argument("--classifier", default="runs/mnist_classifier", help="FD-MNIST classifier (train_classifier.sh)")
    p.add_argument("--shards", default="data/mnist5k")
    p.add_argument("--out", default="runs/reproduce", help="where the runs live")
    p.add_argument("--report", default="docs/reproduce", help="where the table and the plot go")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"error: unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if not (Path(args.shards) / "manifest.json").is_file():
        from latent_ndm.data.writer import make_shards

        make_shards("mnist5k", args.shards)
    results, commands, seconds = {}, {}, {}
    for seed in args.seeds:
        for model in models:
            cmd = commands[(model, seed)] = train_command(args, model, seed)
            print(f"== {model}, seed {seed}: training ({args.steps} steps)", flush=True)
            timing = Path(args.out) / run_name(model, seed) / "reproduce_train_seconds.json"
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            if not timing.is_file():  # the first training's wall time (a finished run re-launched returns at once)
                timing.write_text(json.dumps(time.perf_counter() - t0))
            seconds[(model, seed)] = json.loads(timing.read_text())
            print(f"== {model}, seed {seed}: evaluating", flush=True)
            results[(model, seed)] = evaluate_run(Path(args.out) / run_name(model, seed), args)
            write_report(args, results, commands, seconds)  # partial tables survive an interrupted run
    print((Path(args.report) / "reproduce.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
