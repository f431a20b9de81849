"""Does NDM pay for itself? NDM against its F = identity baseline at equal training compute.

    python -m latent_ndm.experiments.reproduce compute [--datasets mnist5k,digits] [--seeds 0,1,2]
        [--baseline-steps mnist5k=1500,digits=2000] [--ode-images 20] [--out runs/compute] [--report docs/compute]

Four continuous-time models per dataset and seed, all from the dataset's config (configs/ndm_mnist.yaml,
configs/ndm_digits.yaml), trained by the ordinary CLI in their own processes:
- `baseline`: F = identity, the config's denoiser;
- `baseline wide`: F = identity, the denoiser widened (a multiple of its group count in channels) to as many
  parameters as NDM's two networks together;
- `NDM`: the paper's F, a U-Net of the denoiser's size;
- `NDM separable`: the time-separable F (dF/dt in closed form, no tangent pass).

The budget is the baseline's steps. Each model's cost per step, relative to the baseline's, is measured side
by side in one process (latent_ndm.experiments.benchmark.speed: interleaved rounds, median step time; FLOPs by
torch.utils.flop_counter), saved to OUT/DATASET/costs.json and reused by reruns, so step counts stay fixed.
Every model then trains for baseline steps / time ratio (equal wall-clock) and baseline steps / FLOP ratio
(equal FLOPs): to the smaller count, evaluated, then resumed to the larger and evaluated again. The learning
rate is constant after the warm-up, so the resumed run is the run that trains straight through.
`--equal-steps DATASETS` also resumes the first seed's models there to the baseline's steps: the paper's
equal-steps comparison, and an F that has had time to learn for the statistics below.

Each evaluation: the continuous-time test NELBO on all test images (noise keyed by image, so differences are
paired over images and noise), the bound with the ODE NLL on evenly spaced test images (keyed too), and what F
does to the test set (latent_ndm.evaluation.simplify; the baseline's figures are the data's own).

Writes REPORT/compute.{md,json}, REPORT/bpd_vs_flops.png and REPORT/bpd_vs_seconds.png (the periodic test
bits/dim against training FLOPs and against the step time of costs.json x steps), and
REPORT/transform[_diff]_DATASET.png (F(x, t) of seed 0's NDM and NDM separable). Reruns reuse finished runs
and evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from latent_ndm.experiments.reproduce import paired, test_curve

DATASETS = {"mnist5k": "configs/ndm_mnist.yaml", "digits": "configs/ndm_digits.yaml"}
DEFAULT_STEPS = {"mnist5k": 1500, "digits": 2000}
MODELS = {  # name -> overrides of the dataset's config ("baseline wide" gets its width in model_overrides)
    "baseline": ["model.transform=identity"],
    "baseline wide": ["model.transform=identity"],
    "NDM": ["model.transform=neural"],
    "NDM separable": ["model.transform=separable"],
}
BUDGETS = ("wall-clock", "FLOPs")
COMMON = ["model.num_steps=0"]


def _params(config: str, overrides: list[str]) -> int:
    from latent_ndm.config import load_config
    from latent_ndm.tasks.pixel import build_pixel_model

    return sum(p.numel() for p in build_pixel_model(load_config(config, overrides)).parameters())


def wide_channels(config: str) -> tuple[int, int, int]:
    """(channels, its parameters, NDM's parameters): the baseline denoiser's base width, a multiple of its
    GroupNorm groups, whose parameter count is nearest NDM's denoiser and F together."""
    from latent_ndm.config import load_config
    from latent_ndm.nets.unet import UNET_SIZES

    net = load_config(config).model.denoiser
    preset = UNET_SIZES[net.size]
    groups, base = net.groups or preset["groups"], net.channels or preset["channels"]
    target = _params(config, [*COMMON, *MODELS["NDM"]])
    counts = {c: _params(config, [*COMMON, *MODELS["baseline"], f"model.denoiser.channels={c}"])
              for c in range(base, 3 * base + 1, groups)}
    best = min(counts, key=lambda c: abs(counts[c] - target))
    return best, counts[best], target


def model_overrides(model: str, wide: int) -> list[str]:
    return [*COMMON, *MODELS[model], *([f"model.denoiser.channels={wide}"] if model == "baseline wide" else [])]


def measure_costs(dataset: str, args: argparse.Namespace) -> dict:
    """Step time and FLOPs of every model relative to the baseline, side by side; cached in OUT/DATASET."""
    from latent_ndm.experiments.benchmark import speed

    path = Path(args.out) / dataset / "costs.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = DATASETS[dataset]
    wide, wide_params, ndm_params = wide_channels(config)
    table = {m: model_overrides(m, wide) for m in MODELS}
    print(f"== {dataset}: measuring the cost of a training step of each model ({args.cost_rounds} rounds)", flush=True)
    result = speed(config, args.batch_size, steps=args.cost_steps, rounds=args.cost_rounds, variants=list(MODELS),
                   table=table, memory=False, extra=(f"data.shards={args.data}/{dataset}",), mfu=False)  # all four
    costs = {"wide_channels": wide, "wide_params": wide_params, "ndm_params": ndm_params, "batch_size": args.batch_size,
             "threads": torch.get_num_threads(), "models": {}}
    for m in MODELS:
        r = result[m]
        costs["models"][m] = {"params": r["params"], "sec_per_step": r["sec_per_step"],
                              "gflop_per_step": r["gflop_per_step"], "time_ratio": r["ratio_to_baseline"],
                              "flop_ratio": r["flop_ratio_to_baseline"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs, indent=2))
    return costs


def budget_steps(baseline_steps: int, costs: dict) -> dict[str, dict[str, int]]:
    """Each model's steps for each budget: the baseline's steps times the baseline's cost over the model's."""
    return {m: {"wall-clock": max(1, round(baseline_steps / c["time_ratio"])),
                "FLOPs": max(1, round(baseline_steps / c["flop_ratio"]))} for m, c in costs["models"].items()}


def run_name(model: str, seed: int) -> str:
    return f"{model.replace(' ', '_')}_seed{seed}"


def train_command(dataset: str, model: str, seed: int, steps: int, max_steps: int, wide: int,
                  args: argparse.Namespace) -> list[str]:
    every = max(1, math.ceil(max_steps / args.curve_points))  # the same for both phases of a model: resumable
    return [sys.executable, "-m", "latent_ndm.cli", "train", DATASETS[dataset], *model_overrides(model, wide),
            f"name={run_name(model, seed)}", f"out_dir={Path(args.out) / dataset}",
            f"data.shards={args.data}/{dataset}", f"train.seed={seed}", f"train.steps={steps}",
            f"train.batch_size={args.batch_size}", f"train.eval_every={every}", "train.sample_every=0",
            f"train.ckpt_every={steps}", "train.keep_checkpoints=1", "eval.final_examples=50"]


def evaluate(run_dir: Path, steps: int, args: argparse.Namespace) -> dict:
    """Test NELBO (per image), ODE NLL (per image) and F's statistics of the run's checkpoint at `steps`."""
    from latent_ndm.core.process import bits_per_dim
    from latent_ndm.data.streams import eval_examples
    from latent_ndm.evaluation.nelbo import nelbo_per_example
    from latent_ndm.evaluation.simplify import transform_statistics
    from latent_ndm.pipeline import NDMPipeline
    from latent_ndm.training.checkpoint import latest_checkpoint

    cache = run_dir / f"compute_eval_step{steps}.json"
    settings = {"ode_images": args.ode_images, "repeats": args.repeats}
    if cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
        return json.loads(cache.read_text())
    newest = latest_checkpoint(run_dir)
    if newest is None or int(newest.name.split("_")[1]) != steps:
        raise RuntimeError(f"{run_dir}: expected the checkpoint of step {steps}, found {newest}")
    pipe = NDMPipeline.from_pretrained(run_dir)
    images, ids, _ = eval_examples(pipe.config.data, "test", None, 0, 1)
    dims = images[0].numel()
    t0 = time.perf_counter()
    terms = nelbo_per_example(pipe.model, images, ids, 0, repeats=args.repeats, seed=pipe.config.eval.seed)
    per_image = bits_per_dim(sum(terms.values()), dims)
    out: dict = {"settings": settings, "steps": steps,
                 "nelbo": {"bpd": per_image.mean().item(), "stderr": per_image.std().item() / math.sqrt(len(images)),
                           "seconds": time.perf_counter() - t0, "per_image_bpd": per_image.tolist()}}
    if args.ode_images:
        ode_images, ode_ids, _ = eval_examples(pipe.config.data, "test", args.ode_images, 0, 1)
        out["ode_nll"] = pipe.ode_nll_bpd(ode_images, seed=pipe.config.eval.seed, ids=ode_ids, per_image=True,
                                          progress=True)
    out["transform"] = transform_statistics(pipe.model, images)
    cache.write_text(json.dumps(out, indent=2))
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (nan for one seed)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def _pm(values: list[float], digits: int = 3, sign: bool = False) -> str:
    if not values:
        return "-"
    m, se = mean_se(values)
    head = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return head if math.isnan(se) else f"{head} ± {se:.{digits}f}"


def run_dataset(dataset: str, costs: dict, args: argparse.Namespace) -> dict:
    """Train and evaluate the models of one dataset at both budgets, all seeds (and at equal steps, the first
    seed, where asked); returns costs, steps, results."""
    steps = budget_steps(args.baseline_steps[dataset], costs)
    equal_steps = dataset in args.equal_steps
    if equal_steps:
        for model in steps:
            steps[model]["steps"] = args.baseline_steps[dataset]
    results: dict = {}
    for seed in args.seeds:
        for model in args.models:
            run_dir = Path(args.out) / dataset / run_name(model, seed)
            compute = sorted({steps[model][b] for b in BUDGETS})
            counts = sorted({*compute, *([steps[model]["steps"]] if equal_steps and seed == args.seeds[0] else [])})
            seconds = 0.0  # a larger count resumes from the smaller one: its time to reach n is the sum
            for n in counts:
                print(f"== {dataset}, {model}, seed {seed}: training to step {n}", flush=True)
                timing = run_dir / f"compute_train_seconds_step{n}.json"
                t0 = time.perf_counter()
                cmd = train_command(dataset, model, seed, n, compute[-1], costs["wide_channels"], args)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                if not timing.is_file():  # the first training's wall time (a finished run returns at once)
                    timing.write_text(json.dumps(time.perf_counter() - t0))
                print(f"== {dataset}, {model}, seed {seed}: evaluating step {n}", flush=True)
                seconds += json.loads(timing.read_text())
                results[(model, seed, n)] = evaluate(run_dir, n, args) | {"train_seconds": seconds, "command": cmd}
    return {"costs": costs, "steps": steps, "results": results}


def summarize(dataset: str, data: dict, args: argparse.Namespace) -> dict:
    """Per budget and model: NELBO and ODE NLL over seeds, and paired differences from the baseline."""
    steps, results, out = data["steps"], data["results"], {}
    for budget in steps["baseline"]:
        rows = {}
        for model in args.models:
            n = steps[model][budget]
            mine = [results[(model, s, n)] for s in args.seeds if (model, s, n) in results]
            base = [results[("baseline", s, steps["baseline"][budget])] for s in args.seeds
                    if (model, s, n) in results]
            row = {"steps": n, "nelbo": [r["nelbo"]["bpd"] for r in mine],
                   "delta_nelbo": [paired(r["nelbo"]["per_image_bpd"], b["nelbo"]["per_image_bpd"])[0]
                                   for r, b in zip(mine, base)]}
            if args.ode_images:
                row["ode_nll"] = [r["ode_nll"]["bpd"] for r in mine]
                row["ode_nfe"] = [r["ode_nll"]["nfe_mean"] for r in mine]
                row["delta_ode_nll"] = [paired(r["ode_nll"]["per_image_bpd"], b["ode_nll"]["per_image_bpd"])[0]
                                        for r, b in zip(mine, base)]
            row["train_seconds"] = [r["train_seconds"] for r in mine]
            rows[model] = row
        out[budget] = rows
    return out


def transform_budget(data: dict) -> str:
    """The budget whose F the statistics show: equal steps where trained (F has had time to learn), else
    equal wall-clock."""
    return "steps" if "steps" in data["steps"]["baseline"] else "wall-clock"


def transform_table(dataset: str, data: dict, args: argparse.Namespace) -> list[str]:
    """What F does: each statistic's mean over the seeds trained at `transform_budget`, per model and t."""
    steps, results, budget = data["steps"], data["results"], transform_budget(data)
    keys = ("rms_ratio", "effective_dim", "wiener_mse_equal_snr", "wiener_mse_process", "ink", "contrast")
    lines = [f"| F | t | {' | '.join(keys)} |", "|" + " --- |" * (len(keys) + 2)]
    for model in [m for m in ("baseline", "NDM", "NDM separable") if m in args.models]:
        n = steps[model][budget]
        runs = [results[(model, s, n)]["transform"] for s in args.seeds if (model, s, n) in results]
        for t in runs[0] if runs else ():
            cells = [f"{statistics.fmean(r[t][k] for r in runs):{'.1f' if k == 'effective_dim' else '.4g'}}"
                     for k in keys]
            name = "identity (the data, x)" if model == "baseline" else model
            lines.append(f"| {name} | {t[2:]} | {' | '.join(cells)} |")
    return lines


def write_report(all_data: dict, args: argparse.Namespace) -> None:
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    lines = ["# Does NDM pay for itself? NDM against its baseline at equal training compute", "",
             f"Continuous time, batch {args.batch_size}, seeds {args.seeds}; test NELBO on all test images "
             f"({args.repeats} keyed draws each), ODE NLL on {args.ode_images} evenly spaced test images. "
             "Δ = model minus the baseline at the same budget, paired over images and noise, then mean ± standard "
             "error over seeds (negative = better than the baseline). Budgets come from the costs measured side by "
             "side; `measured train s` is the training runs' own wall time, which anything else running on the "
             "machine inflates.", ""]
    summary = {}
    for dataset, data in all_data.items():
        costs = data["costs"]
        summary[dataset] = s = summarize(dataset, data, args)
        lines += [f"## {dataset} ({DATASETS[dataset]}, baseline {args.baseline_steps[dataset]} steps)", "",
                  f"Cost per step, measured side by side ({costs['threads']} threads):", "",
                  "| model | parameters | ms/step | time / baseline | GFLOP/step | FLOPs / baseline |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for m, c in costs["models"].items():
            lines.append(f"| {m} | {c['params']:,} | {1e3 * c['sec_per_step']:.1f} | {c['time_ratio']:.2f} | "
                         f"{c['gflop_per_step']:.2f} | {c['flop_ratio']:.2f} |")
        lines += ["", f"`baseline wide`: denoiser base width {costs['wide_channels']} "
                      f"({costs['wide_params']:,} parameters against NDM's {costs['ndm_params']:,}).", ""]
        for budget in s:
            seeds = "" if budget != "steps" else f" (the paper's comparison; seed {args.seeds[0]} only)"
            lines += [f"### Equal {budget}{seeds}", "",
                      "| model | steps | NELBO | Δ NELBO | ODE NLL (NFE) | Δ ODE NLL | measured train s |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for m, row in s[budget].items():
                ode = "-" if "ode_nll" not in row else \
                    f"{_pm(row['ode_nll'])} ({statistics.fmean(row['ode_nfe']):.0f})" if row["ode_nll"] else "-"
                d_ode = _pm(row.get("delta_ode_nll", []), sign=True) if m != "baseline" else ""
                d_nelbo = _pm(row["delta_nelbo"], sign=True) if m != "baseline" else ""
                lines.append(f"| {m} | {row['steps']} | {_pm(row['nelbo'])} | {d_nelbo} | {ode} | {d_ode} | "
                             f"{_pm(row['train_seconds'], 0)} |")
            lines.append("")
        which = "equal steps, seed 0" if transform_budget(data) == "steps" else "equal wall-clock, mean over seeds"
        lines += [f"### What F does ({which})", "",
                  *transform_table(dataset, data, args), "",
                  f"![F(x, t) of the NDMs](transform_{dataset}.png)", ""]
    lines += ["![test bits/dim against training FLOPs](bpd_vs_flops.png)", "",
              "![test bits/dim against modelled wall-clock](bpd_vs_seconds.png)", "", "## Commands", "",
              "    python -m latent_ndm.experiments.reproduce compute " + " ".join(sys.argv[2:]), "",
              "Each run was trained by (seed 0; the others differ in train.seed and name):", ""]
    for data in all_data.values():
        for (_, seed, _), r in data["results"].items():
            if seed == args.seeds[0]:
                lines.append("    " + " ".join(["python", *r["command"][1:]]))
    (report / "compute.md").write_text("\n".join(lines) + "\n")
    (report / "compute.json").write_text(json.dumps(
        {d: {"costs": v["costs"], "steps": v["steps"], "summary": summary[d],
             "transform": {f"{m} seed{s} step{n}": r["transform"] for (m, s, n), r in v["results"].items()}}
         for d, v in all_data.items()}, indent=2))
    plot_curves(all_data, args, report)
    pictures(all_data, args, report)


def plot_curves(all_data: dict, args: argparse.Namespace, report: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # matplotlib comes with the data extra (mlxtend)
        raise RuntimeError("the plots need matplotlib: pip install 'latent-ndm[data]'") from e
    colours = dict(zip(MODELS, ("tab:blue", "tab:cyan", "tab:red", "tab:orange")))
    for axis, key, label in (("flops", "gflop_per_step", "training GFLOPs"),
                             ("seconds", "sec_per_step", "training seconds (measured step time x steps)")):
        fig, axes = plt.subplots(1, len(all_data), figsize=(6.0 * len(all_data), 4.0), squeeze=False)
        for ax, (dataset, data) in zip(axes[0], all_data.items()):
            for model in args.models:
                per_step = data["costs"]["models"][model][key]
                for i, seed in enumerate(args.seeds):
                    curve = test_curve(Path(args.out) / dataset / run_name(model, seed))
                    if curve:
                        xs, ys = zip(*curve)
                        ax.plot([x * per_step for x in xs], ys, color=colours[model], marker="o", ms=2, lw=1,
                                label=model if i == 0 else None)
            ax.set_xlabel(label)
            ax.set_ylabel("test NELBO, bits/dim (periodic evaluation)")
            ax.set_title(dataset)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(report / f"bpd_vs_{axis}.png", dpi=110)
        plt.close(fig)


def pictures(all_data: dict, args: argparse.Namespace, report: Path) -> None:
    """F(x, t) at t = 0, 0.25, ..., 1 of one test image per class (eight classes), seed 0's newest checkpoint
    (equal steps where trained, else the larger compute budget): each row holds NDM's frames, then NDM
    separable's (transform_DATASET.png), and the same rows as the difference from x, scaled to the largest
    and mid-grey = 0 (transform_diff_DATASET.png)."""
    import numpy as np

    from latent_ndm.data.shards import read_split
    from latent_ndm.evaluation.images import save_grid
    from latent_ndm.evaluation.pictures import TIMES, transform_rows
    from latent_ndm.pipeline import NDMPipeline

    for dataset in all_data:
        frames, diffs = [], []
        for model in [m for m in ("NDM", "NDM separable") if m in args.models]:
            run_dir = Path(args.out) / dataset / run_name(model, args.seeds[0])
            pipe = NDMPipeline.from_pretrained(run_dir)
            test = read_split(pipe.config.data.shards, "test")
            pick = [int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)][:8]
            f, d, _ = transform_rows(pipe.model, torch.from_numpy(test.images[pick]))
            frames.append(f.unflatten(0, (len(pick), len(TIMES))))
            diffs.append(d.unflatten(0, (len(pick), len(TIMES))))
        if frames:
            columns = len(frames) * len(TIMES)
            save_grid(torch.cat(frames, 1).flatten(0, 1), report / f"transform_{dataset}.png", nrow=columns)
            save_grid(torch.cat(diffs, 1).flatten(0, 1), report / f"transform_diff_{dataset}.png", nrow=columns)


def parse_steps(text: str) -> dict[str, int]:
    out = dict(DEFAULT_STEPS)
    for item in filter(None, text.split(",")):
        name, _, n = item.partition("=")
        if name not in DATASETS or not n.isdigit():
            raise argparse.ArgumentTypeError(f"expected DATASET=STEPS with DATASET in {list(DATASETS)}, got {item!r}")
        out[name] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reproduce compute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {list(DATASETS)}")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of: {', '.join(MODELS)} (the baseline is always trained)")
    p.add_argument("--baseline-steps", type=parse_steps, default=dict(DEFAULT_STEPS),
                   help="the budget: the baseline's training steps, e.g. mnist5k=1500,digits=2000")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4, help="keyed (t, eps) draws per test image for the NELBO")
    p.add_argument("--ode-images", type=int, default=20, help="test images for the ODE NLL (0: skip)")
    p.add_argument("--equal-steps", type=lambda s: [d for d in s.split(",") if d], default=[],
                   help="comma-separated datasets on which the first seed's models also train to the baseline's "
                        "steps (the paper's equal-steps comparison; F's statistics then show that F)")
    p.add_argument("--curve-points", type=int, default=8, help="periodic test evaluations per run (the plots)")
    p.add_argument("--cost-steps", type=int, default=3, help="timed steps per model per round of the cost measurement")
    p.add_argument("--cost-rounds", type=int, default=5)
    p.add_argument("--data", default="data", help="where the datasets' shards are (made if absent)")
    p.add_argument("--out", default="runs/compute", help="where the runs live")
    p.add_argument("--report", default="docs/compute", help="where the tables and plots go")
    args = p.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if set(datasets) - set(DATASETS):
        raise SystemExit(f"error: unknown dataset(s) {sorted(set(datasets) - set(DATASETS))}; choose from "
                         f"{', '.join(DATASETS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"error: unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    args.models = [m for m in MODELS if m in models or m == "baseline"]  # the differences need the baseline
    costs = {}
    for dataset in datasets:  # all costs first, on a machine not yet busy with this experiment's training
        if not (Path(args.data) / dataset / "manifest.json").is_file():
            from latent_ndm.data.writer import make_shards

            make_shards(dataset, Path(args.data) / dataset)
        costs[dataset] = measure_costs(dataset, args)
    all_data = {}
    for dataset in datasets:
        all_data[dataset] = run_dataset(dataset, costs[dataset], args)
        write_report(all_data, args)  # what is finished survives an interrupted run
    print((Path(args.report) / "compute.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
