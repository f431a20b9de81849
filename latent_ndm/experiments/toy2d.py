"""2D experiments: NDM against its F = identity baseline on checkerboard, 8 Gaussians and two moons,
and NDM trained with a curvature penalty on its probability-flow paths (NFDM-OT's straight paths).

    python -m latent_ndm.experiments.toy2d [--steps 2000] [--curvature-weight 1e-3] [--out docs/figures/2d]

(scripts/experiments_2d.sh). Per dataset it trains the three models (and, with --models, the
ablations of ALL_MODELS) with the same denoiser network, steps and seed, then measures sample quality
against held-out data (sliced Wasserstein, energy distance) after 1, 2, 4 and 8 Euler steps of the
probability-flow ODE and a 100-step Heun reference, the straightness of the ODE paths and the test
NELBO; it writes results_2d.json, results_2d.md and PNG pictures (latent_ndm.experiments.toy2d_plots).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.ndm import NDM, Denoiser
from latent_ndm.core.noise import Noise, keyed_generator
from latent_ndm.core.schedules import LinearGamma
from latent_ndm.core.timesteps import ImportanceSampler
from latent_ndm.core.transforms import IdentityTransform, NeuralTransform
from latent_ndm.evaluation.distances import energy_distance, sliced_wasserstein
from latent_ndm.nets.layers import sinusoidal_time_embedding, timestep_frequencies
from latent_ndm.sampling.paths import curvature_penalty, ode_paths, straightness, velocity_deviation
from latent_ndm.sampling.samplers import ode_euler
from latent_ndm.training.ema import EMA
from latent_ndm.training.step import lr_factor, train_step

# -- data: each [n, 2] float32, mean 0 and unit variance per coordinate (exactly, in distribution) ----


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 cells (i, j) of a 4x4 board on [-2, 2]^2 with i + j even, scaled by sqrt(3)/2."""
    col = torch.rand(n, generator=generator) * 4 - 2
    # Two of the four rows per column: floor(row) + floor(col) even.
    row = torch.rand(n, generator=generator) + 2 * torch.randint(0, 2, (n,), generator=generator) - 2
    row = row + torch.remainder(torch.floor(col), 2)
    return torch.stack([col, row], 1) * (math.sqrt(3) / 2)  # U[-2, 2] has variance 4/3


EIGHT_GAUSSIANS_STD = 0.1


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Gaussians of std 0.1 at 8 equally spaced points of the circle of radius sqrt(2 (1 - 0.1^2))."""
    s = EIGHT_GAUSSIANS_STD
    radius = math.sqrt(2 * (1 - s**2))  # per-coordinate variance radius^2 / 2 + s^2 = 1
    angle = torch.randint(0, 8, (n,), generator=generator) * (math.pi / 4)
    centres = radius * torch.stack([angle.cos(), angle.sin()], 1)
    return centres + s * torch.randn(n, 2, generator=generator)


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> Tensor:
    """scikit-learn's two moons (unit half circles at (0, 0) and (1, 0.5), Gaussian noise), standardised
    with the exact moments: mean (1/2, 1/4), variances 3/4 + noise^2 and 9/16 - 1/pi + noise^2."""
    theta = torch.rand(n, generator=generator) * math.pi
    lower = torch.randint(0, 2, (n,), generator=generator).bool()
    x = torch.where(lower, 1 - theta.cos(), theta.cos())
    y = torch.where(lower, 0.5 - theta.sin(), theta.sin())
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator)
    mean = torch.tensor([0.5, 0.25])
    std = torch.tensor([0.75 + noise**2, 9 / 16 - 1 / math.pi + noise**2]).sqrt()
    return (pts - mean) / std


DATASETS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "checkerboard": checkerboard,
    "8gaussians": eight_gaussians,
    "moons": two_moons,
}


def sample_data(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    if name not in DATASETS:
        raise ValueError(f"unknown 2D dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](n, generator)


# -- network and model --------------------------------------------------------------------------------


class TimeMLP(nn.Module):
    """(x [B, D], t [B]) -> [B, D]: SiLU MLP on [x, sinusoidal embedding of t (the U-Net's)], the time
    embedding also added to every hidden layer. Last layer zero-initialised: as NN inside F, F starts as
    the identity; as a denoiser, eps_hat starts at 0. Smooth, so it works under nested torch.func.jvp."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 32):
        super().__init__()
        self.register_buffer("freqs", timestep_frequencies(emb_dim), persistent=False)
        self.inp = nn.Linear(dim + emb_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.time = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"TimeMLP expects x of shape [B, D], got {tuple(x.shape)}")
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = sinusoidal_time_embedding(t, self.freqs, self.out.weight.dtype)  # [B, emb_dim]
        h = _silu(self.inp(torch.cat([x, emb], 1)))
        for layer, time_proj in zip(self.hidden, self.time):
            h = _silu(layer(h) + time_proj(emb))
        return self.out(h)


def _silu(x: Tensor) -> Tensor:
    # Not F.silu: its derivative op silu_backward has no forward-AD rule, so F.silu fails under nested
    # forward mode (the curvature penalty) unless autograd happens to decompose it (grad mode on).
    return x * torch.sigmoid(x)


MODELS = ("baseline", "ndm", "ndm_straight")  # F = identity | F learned | F learned + curvature penalty
# Ablations: which parameters do the straightening? baseline_straight: F = identity + the penalty (theta alone
# can follow it); ndm_straight_phi: the penalty's gradient reaches only phi (theta stays on the NELBO).
ALL_MODELS = (*MODELS, "baseline_straight", "ndm_straight_phi")


def build_toy_ndm(transform: str = "neural", hidden: int = 128, depth: int = 3, gamma_min: float = -10.0,
                  gamma_max: float = 10.0, dim: int = 2, seed: int = 0) -> NDM:
    """A continuous-time NDM for points in R^dim (Gaussian p(x | z_0)), F = x + t NN(x, t) ('neural') or
    F = x ('identity'). The denoiser is built first from `seed`, so both choices get the same initial one."""
    if transform not in ("neural", "identity"):
        raise ValueError(f"transform must be 'neural' or 'identity', got {transform!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        denoiser = Denoiser(TimeMLP(dim, hidden, depth), "eps")
        f = NeuralTransform(TimeMLP(dim, hidden, depth)) if transform == "neural" else IdentityTransform()
    return NDM(LinearGamma(gamma_min, gamma_max), f, denoiser, "gaussian", 0, (dim,))


# -- training --------------------------------------------------------------------------------------------


class _ToyObjective(nn.Module):
    """The 2D training objective as `train_step` runs it: per-example NELBO (nats) plus the curvature penalty.

    With curvature_params='transform' the penalty's gradient is added to phi's .grad here, before the step's
    backward adds the NELBO's: theta then follows the NELBO alone."""

    def __init__(self, ndm: NDM, loss: NDMLoss, curvature_weight: float, curvature_batch: int,
                 curvature_params: str, seed: int):
        super().__init__()
        self.ndm, self.loss = ndm, loss
        self.weight, self.batch, self.params, self.seed = curvature_weight, curvature_batch, curvature_params, seed
        self.loss_scale = 1.0 / math.prod(ndm.data_shape)  # optimise nats per dimension

    def forward(self, x: Tensor, noise: Noise, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        nelbo = sum(self.loss(self.ndm, x, noise).values())  # [B]
        metrics = {"nelbo": nelbo.detach().mean()}
        if self.weight > 0:
            xc = x[: self.batch]
            g = keyed_generator(x.device, self.seed, "curvature", step)
            penalty = curvature_penalty(self.ndm, xc, Noise.from_generator(g, len(xc), x.device)).mean()
            if self.params == "all":
                nelbo = nelbo + self.weight * penalty
            else:
                phi = list(self.ndm.transform.parameters())
                for p, grad in zip(phi, torch.autograd.grad(self.weight * penalty * self.loss_scale, phi)):
                    p.grad = grad if p.grad is None else p.grad + grad
            metrics["curvature"] = penalty.detach()
        return nelbo, metrics


def train_toy(ndm: NDM, dataset: str, steps: int = 2000, batch_size: int = 256, lr: float = 2e-3,
              curvature_weight: float = 0.0, curvature_batch: int = 128, ema_decay: float = 0.999,
              warmup_steps: int = 50, grad_clip: float = 1.0, seed: int = 0, progress: bool = True,
              curvature_params: str = "all", importance_sampling: bool = True
              ) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train on fresh draws of `dataset` each step; returns (EMA model, per-step log).

    Loss = NELBO per dimension + curvature_weight * E||dv/dt||^2 / dim on the first `curvature_batch`
    points. phi and theta both train on the true NELBO; the penalty is added on top (docs/MATH.md,
    section 8), its gradient reaching every parameter (curvature_params='all') or only phi, the
    parameters of F ('transform': the denoiser then follows the NELBO alone).

    The step is the shard-streaming loop's (`training.step.train_step`); the data are a closed-form sampler
    and a run takes a minute, so there are no shards, checkpoints or processes around it. Noise is keyed by
    (seed, step) as there, and the EMA is the same.
    """
    if curvature_params not in ("all", "transform"):
        raise ValueError(f"curvature_params must be 'all' or 'transform', got {curvature_params!r}")
    if curvature_weight > 0 and curvature_params == "transform" and not list(ndm.transform.parameters()):
        raise ValueError("curvature_params='transform' needs a learned F")
    loss = NDMLoss(ImportanceSampler() if importance_sampling else None).to(ndm.device)
    objective = _ToyObjective(ndm, loss, curvature_weight, curvature_batch, curvature_params, seed)
    opt = torch.optim.AdamW(ndm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps))
    ema = EMA(ndm, ema_decay)
    device, log = ndm.device, []
    objective.train()
    bar = tqdm(range(steps), disable=not progress, desc=f"{dataset} {'+'.join(_describe(ndm, curvature_weight))}",
               dynamic_ncols=True, leave=False)
    for step in bar:
        x = sample_data(dataset, batch_size, keyed_generator("cpu", seed, "data", step)).to(device)
        noise = Noise.from_generator(keyed_generator(device, seed, "nelbo", step), batch_size, device)
        res = train_step(objective, [(x, noise)], step, objective.loss_scale, opt, sched, grad_clip, ema, ndm,
                         loss.update_proposal)
        log.append({k: v.item() for k, v in res.metrics.items()})
        if step % 50 == 0:
            bar.set_postfix({k: f"{v:.3g}" for k, v in log[-1].items()})
    ndm.eval()
    return ema.model, log


def _describe(ndm: NDM, curvature_weight: float) -> list[str]:
    return ["baseline" if ndm.transform.is_identity else "ndm"] + (["curvature"] if curvature_weight > 0 else [])


# -- evaluation ------------------------------------------------------------------------------------------

EULER_STEPS = (1, 2, 4, 8)
REFERENCE_STEPS = 100  # Heun steps of the reference solve (199 drift evaluations)


def evaluate_toy(ndm: NDM, test: Tensor, seed: int = 0, n_samples: int | None = None) -> dict:
    """Sample quality against held-out `test` after 1, 2, 4, 8 Euler steps and 100 Heun steps (all from
    the same z_1), path straightness from the Heun solve, test NELBO and E||dv/dt||^2 (nats, per point)."""
    n = n_samples or len(test)
    ndm.eval()
    device = ndm.device
    test = test.to(device)
    z_1 = torch.randn((n, *ndm.data_shape), generator=keyed_generator(device, seed, "z1"), device=device)
    out: dict = {"euler": {}}

    def quality(x: Tensor) -> dict[str, float]:
        g = keyed_generator("cpu", seed, "projections")  # the same directions for every sample set
        return {"sw": sliced_wasserstein(x, test, generator=g), "energy": energy_distance(x, test)}

    samples: dict[str, Tensor] = {}
    for k in EULER_STEPS:
        x = ode_euler(ndm, tuple(z_1.shape), keyed_generator(device, seed, "z1"), k).x  # from the same z_1
        out["euler"][str(k)] = quality(x)
        samples[f"euler{k}"] = x
    ts, path = ode_paths(ndm, z_1, REFERENCE_STEPS)
    samples["heun"] = ndm.decode_z0(path[-1])
    out["heun"] = quality(samples["heun"])
    out["straightness"] = straightness(path).mean().item()
    out["velocity_deviation"] = velocity_deviation(path, ts).mean().item()
    noise = Noise.from_generator(keyed_generator(ndm.device, seed, "test-nelbo"), len(test), ndm.device)
    with torch.no_grad():
        out["test_nelbo"] = sum(NDMLoss().eval()(ndm, test, noise).values()).mean().item()
        g = keyed_generator(ndm.device, seed, "test-curvature")
        out["test_curvature"] = curvature_penalty(ndm, test, g).mean().item()
    return out | {"_samples": samples, "_path": path}


# -- the experiment -------------------------------------------------------------------------------------------


def run_experiments(out_dir: Path, datasets: tuple[str, ...] = tuple(DATASETS), steps: int = 2000,
                    batch_size: int = 256, lr: float = 2e-3, curvature_weight: float = 1e-3, hidden: int = 128,
                    depth: int = 3, n_eval: int = 2000, seed: int = 0, plots: bool = True,
                    models: tuple[str, ...] = MODELS) -> dict:
    """Train and evaluate baseline, NDM and NDM + curvature penalty on each dataset; write the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in locals().items() if k != "out_dir"} | {"out_dir": str(out_dir)}
    results: dict = {"config": config, "datasets": {}}
    start = time.perf_counter()
    for name in datasets:
        test = sample_data(name, n_eval, keyed_generator("cpu", seed, name, "test"))
        floor = sample_data(name, n_eval, keyed_generator("cpu", seed, name, "test2"))
        g = keyed_generator("cpu", seed, "projections")
        entry: dict = {"data_floor": {"sw": sliced_wasserstein(floor, test, generator=g),
                                      "energy": energy_distance(floor, test)}, "models": {}}
        trained: dict[str, tuple[NDM, dict]] = {}
        for model in models:
            t0 = time.perf_counter()
            ndm = build_toy_ndm("identity" if model.startswith("baseline") else "neural", hidden, depth, seed=seed)
            weight = curvature_weight if "_straight" in model else 0.0
            ema, log = train_toy(ndm, name, steps, batch_size, lr, weight, seed=seed,
                                 curvature_params="transform" if model.endswith("_phi") else "all")
            train_s = time.perf_counter() - t0
            ev = evaluate_toy(ema, test, seed)
            tail = log[-100:]
            ev["train_nelbo_last100"] = sum(r["nelbo"] for r in tail) / len(tail)
            ev["train_seconds"], ev["eval_seconds"] = train_s, time.perf_counter() - t0 - train_s
            trained[model] = (ema, ev)
            entry["models"][model] = {k: v for k, v in ev.items() if not k.startswith("_")}
            print(f"{name:>12} {model:<16} sw(E1,E8,Heun)={ev['euler']['1']['sw']:.3f},"
                  f"{ev['euler']['8']['sw']:.3f},{ev['heun']['sw']:.3f} straightness={ev['straightness']:.3f} "
                  f"nelbo={ev['test_nelbo']:.3f} ({train_s:.0f}s)", flush=True)
        if plots:
            from latent_ndm.experiments.toy2d_plots import plot_dataset

            plot_dataset(out_dir, name, test, trained)
        results["datasets"][name] = entry
    results["total_seconds"] = time.perf_counter() - start
    (out_dir / "results_2d.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results_2d.md").write_text(results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    c = results["config"]
    lines = [f"# 2D experiments: {', '.join(c['models'])} (curvature penalty lambda = {c['curvature_weight']:g})", "",
             "baseline: F = identity; ndm: F = x + t NN(x, t); *_straight: the same + the curvature penalty "
             "(*_straight_phi: its gradient reaches only F's parameters).",
             f"{c['steps']} training steps, batch {c['batch_size']}, MLP width {c['hidden']} x depth {c['depth']}, "
             f"seed {c['seed']}; {c['n_eval']} samples against {c['n_eval']} held-out points. SW: sliced "
             "Wasserstein-2 (256 projections); ED: energy distance; E1..E8: Euler steps of the probability-flow "
             "ODE; H100: 100 Heun steps (199 evaluations). Straightness ||z_0 - z_1|| / path length and velocity "
             "deviation int ||v - chord||^2 dt of the H100 paths; NELBO and E||dv/dt||^2 on held-out data in "
             "nats per point. 'data' compares a second held-out draw (the sampling floor).", ""]
    head = ("| dataset | model | SW E1 | SW E2 | SW E4 | SW E8 | SW H100 | ED E1 | ED E2 | ED E4 | ED E8 | ED H100 "
            "| straightness | vel. dev. | test NELBO | E‖dv/dt‖² |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, entry in results["datasets"].items():
        f = entry["data_floor"]
        sw, ed = f"{f['sw']:.3f}", f"{f['energy']:.4f}"
        lines.append(f"| {name} | data | " + " | ".join([sw] * 5 + [ed] * 5) + " | | | | |")
        for model, m in entry["models"].items():
            sw = [m["euler"][str(k)]["sw"] for k in EULER_STEPS] + [m["heun"]["sw"]]
            ed = [m["euler"][str(k)]["energy"] for k in EULER_STEPS] + [m["heun"]["energy"]]
            lines.append(f"| {name} | {model} | " + " | ".join(f"{v:.3f}" for v in sw) + " | "
                         + " | ".join(f"{v:.4f}" for v in ed)
                         + f" | {m['straightness']:.4f} | {m['velocity_deviation']:.3f} | {m['test_nelbo']:.3f} "
                         f"| {m['test_curvature']:.3g} |")
    lines += ["", f"Total time {results['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments_2d.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {', '.join(DATASETS)}")
    p.add_argument("--steps", type=int, default=2000, help="training steps per model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--curvature-weight", type=float, default=1e-3, help="lambda of the curvature penalty")
    p.add_argument("--hidden", type=int, default=128, help="MLP width (denoiser and NN inside F)")
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    p.add_argument("--eval-points", type=int, default=2000, help="samples and held-out points per comparison")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(ALL_MODELS)} (baseline_straight: an ablation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/figures/2d"), help="output folder")
    p.add_argument("--no-plots", action="store_true", help="write only results_2d.json and results_2d.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: these MLPs are too small to gain from more, and contend)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    datasets = tuple(d.strip() for d in a.datasets.split(",") if d.strip())
    models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    for d in datasets:
        if d not in DATASETS:
            p.error(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)}")
    for m in models:
        if m not in ALL_MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(ALL_MODELS)}")
    run_experiments(a.out, datasets, a.steps, a.batch_size, a.lr, a.curvature_weight, a.hidden, a.depth,
                    a.eval_points, a.seed, not a.no_plots, models)
    print((a.out / "results_2d.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
