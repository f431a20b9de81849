"""Pictures of the 2D experiments (latent_ndm.experiments.toy2d): the learned F(x, t), samples against held-out data
and probability-flow ODE paths. matplotlib is needed only here (it comes with the `data` extra)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from latent_ndm.core.ndm import NDM

TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)
LABELS = {"baseline": "baseline (F = x)", "ndm": "NDM", "ndm_straight": "NDM + curvature",
          "baseline_straight": "baseline + curvature", "ndm_straight_phi": "NDM + curvature (F only)"}
LIMIT = 3.2  # axis half-width: the data have unit variance and z_1 ~ N(0, I)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the 2D pictures need matplotlib (pip install matplotlib, or install the project's "
                          "'data' extra); pass --no-plots to write only the results") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _square(ax, limit: float = LIMIT) -> None:
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def point_colours(x: Tensor):
    """One colour per data point from its angle around the origin (hue) and radius (lightness), so a
    point keeps its colour wherever F moves it."""
    import matplotlib.colors as mcolors

    hue = (torch.atan2(x[:, 1], x[:, 0]) / (2 * math.pi) + 0.5).numpy()
    value = (0.55 + 0.45 * (x.norm(dim=1) / x.norm(dim=1).max())).numpy()
    hsv = torch.stack([torch.from_numpy(hue), torch.full_like(torch.from_numpy(hue), 0.85),
                       torch.from_numpy(value)], 1).numpy()
    return mcolors.hsv_to_rgb(hsv)


@torch.no_grad()
def plot_transform(path: Path, x: Tensor, models: dict[str, NDM], times: tuple[float, ...] = TIMES) -> Path:
    """Two rows per model, a column per t: the points F(x, t) of held-out x coloured by x, and below them
    x + k (F(x, t) - x), the displacement magnified so that its largest value over the row is 0.5 (as the
    pixel pictures show F - x with its scale; k and the RMS of |F - x| are printed)."""
    plt = _pyplot()
    colours = point_colours(x)
    rows = 2 * len(models)
    fig, axes = plt.subplots(rows, len(times), figsize=(2.4 * len(times), 2.55 * rows), squeeze=False)
    for m, (name, ndm) in enumerate(models.items()):
        fs = torch.stack([ndm.transform_many([(x.to(ndm.device), torch.full((len(x),), t, dtype=torch.float64,
                                                                             device=ndm.device))])[0].cpu()
                          for t in times])  # [T, N, 2]
        shift = fs - x
        k = 0.5 / float(shift.norm(dim=-1).max().clamp_min(1e-12))
        limit = max(LIMIT, float(fs.abs().quantile(0.995)) * 1.05)
        for col, t in enumerate(times):
            rms = float(shift[col].square().sum(-1).mean().sqrt())
            for r, (pts, title) in enumerate([(fs[col], f"F(x, {t:g})"),
                                              (x + k * shift[col], f"rms |F - x| = {rms:.3g}")]):
                ax = axes[2 * m + r, col]
                ax.scatter(pts[:, 0], pts[:, 1], c=colours, s=1.5, linewidths=0, rasterized=True)
                _square(ax, limit)
                ax.set_title(title, fontsize=8)
        label = LABELS.get(name, name)
        axes[2 * m, 0].set_ylabel(label, fontsize=9)
        axes[2 * m + 1, 0].set_ylabel(f"{label}: x + {k:.3g} (F - x)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_samples(path: Path, test: Tensor, samples: dict[str, dict[str, Tensor]]) -> Path:
    """A row per model, a column per sampler: samples (blue) over held-out data (grey)."""
    plt = _pyplot()
    keys = list(next(iter(samples.values())))
    titles = {k: (f"Euler {k[5:]} step" + ("s" if k[5:] != "1" else "")) if k.startswith("euler") else
              "Heun 100 steps" for k in keys}
    fig, axes = plt.subplots(len(samples), len(keys), figsize=(2.4 * len(keys), 2.5 * len(samples)), squeeze=False)
    for row, (name, by_sampler) in enumerate(samples.items()):
        for col, key in enumerate(keys):
            ax, x = axes[row, col], by_sampler[key].cpu()
            ax.scatter(test[:, 0], test[:, 1], c="0.8", s=1.5, linewidths=0, rasterized=True)
            ax.scatter(x[:, 0], x[:, 1], c="tab:blue", s=1.5, linewidths=0, alpha=0.7, rasterized=True)
            _square(ax)
            if row == 0:
                ax.set_title(titles[key], fontsize=9)
        axes[row, 0].set_ylabel(LABELS.get(name, name), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_paths(path: Path, test: Tensor, paths: dict[str, Tensor], num: int = 48) -> Path:
    """A panel per model: `num` probability-flow ODE paths [K+1, N, 2] from z_1 (grey dot) to the sample
    (black dot), over held-out data."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(paths), figsize=(3.2 * len(paths), 3.3), squeeze=False)
    for ax, (name, p) in zip(axes[0], paths.items()):
        p = p[:, :num].cpu()
        ax.scatter(test[:, 0], test[:, 1], c="0.85", s=1.5, linewidths=0, rasterized=True)
        ax.plot(p[:, :, 0], p[:, :, 1], lw=0.7, alpha=0.8)
        ax.scatter(p[0, :, 0], p[0, :, 1], c="0.5", s=6, zorder=3)
        ax.scatter(p[-1, :, 0], p[-1, :, 1], c="k", s=6, zorder=3)
        _square(ax)
        ax.set_title(LABELS.get(name, name), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_dataset(out_dir: Path, name: str, test: Tensor, trained: dict[str, tuple[NDM, dict]]) -> list[Path]:
    """The three pictures of one dataset: {name}_transform.png (F of the learned-F models),
    {name}_samples.png and {name}_paths.png."""
    learned = {m: ndm for m, (ndm, _) in trained.items() if not ndm.transform.is_identity}
    return [
        plot_transform(out_dir / f"{name}_transform.png", test, learned),
        plot_samples(out_dir / f"{name}_samples.png", test, {m: ev["_samples"] for m, (_, ev) in trained.items()}),
        plot_paths(out_dir / f"{name}_paths.png", test, {m: ev["_path"] for m, (_, ev) in trained.items()}),
    ]
