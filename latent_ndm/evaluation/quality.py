"""Sample quality: Frechet distances between Gaussians fitted to features of two image sets.

- FID: features from the standard Inception-v3 (torch-fidelity's port of the TensorFlow 2015-12-05
  graph, pool3, 2048-d), read from a local file (`pip install 'latent-ndm[eval]'`). Nothing is
  downloaded: give the path of `weights-inception-2015-12-05-6726825d.pth` (from INCEPTION_URL) as an
  argument or in $LATENT_NDM_INCEPTION_WEIGHTS.
- FD-MNIST: the same distance in the 128-d penultimate features of the project's own MNIST
  classifier (latent_ndm.evaluation.classifier, scripts/train_classifier.sh). NOT FID: its values depend on
  that classifier and compare only with each other.

    sample_quality(pipe, "runs/mnist_classifier", steps=(10, 100, 1000), num_samples=500)   # -> dict (JSON)

Both are biased upwards for finite sets (more so with fewer images than feature dimensions): compare
numbers computed from the same number of images; the report gives train-vs-test images as a floor.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from latent_ndm.evaluation.classifier import ImageClassifier

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"  # docs only
INCEPTION_ENV = "LATENT_NDM_INCEPTION_WEIGHTS"
METRICS = ("fd_mnist", "fid")
DEFINITIONS = {
    "fd_mnist": "Frechet distance between Gaussians fitted to the 128-d penultimate features of the project's MNIST "
                "classifier (scripts/train_classifier.sh); NOT FID, comparable only for the same classifier",
    "fid": "Frechet Inception distance: torch-fidelity's Inception-v3 (TF 2015-12-05 weights), 2048-d pool3 features",
}


# -- the Frechet distance ---------------------------------------------------------------------


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [D], unbiased covariance [D, D]) of features [N, D], in float64."""
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"features must be [N >= 2, D], got {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def _sym_sqrt(a: Tensor) -> Tensor:
    """The PSD square root of a symmetric matrix (negative round-off eigenvalues clipped to 0)."""
    evals, evecs = torch.linalg.eigh((a + a.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2):
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64.

    The middle matrix is symmetric PSD, so its square root's trace is the sum of the square roots of
    its (clipped) eigenvalues: no complex round-off as with scipy's sqrtm of the non-symmetric S1 S2."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(v).to("cpu", torch.float64) for v in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: {tuple(mu1.shape)}, {tuple(cov1.shape)} vs "
                         f"{tuple(mu2.shape)}, {tuple(cov2.shape)}")
    root1 = _sym_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_covmean
    return max(float(d2), 0.0)  # >= 0 exactly; round-off can leave -1e-12 for identical sets


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


# -- feature extractors -----------------------------------------------------------------------


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The local Inception weights file: `path`, else $LATENT_NDM_INCEPTION_WEIGHTS (a file, or a folder
    holding INCEPTION_FILE). Missing: one FileNotFoundError naming the file and where to get it."""
    given = path or os.environ.get(INCEPTION_ENV) or ""
    p = Path(given) / INCEPTION_FILE if given and Path(given).is_dir() else Path(given)
    if not given or not p.is_file():
        where = f"{p} does not exist" if given else f"no path was given (argument or ${INCEPTION_ENV})"
        raise FileNotFoundError(f"FID needs the Inception-v3 weights file {INCEPTION_FILE} and never downloads it: "
                                f"{where}. Get it from {INCEPTION_URL} and pass its path (--inception-weights PATH "
                                f"or {INCEPTION_ENV}=PATH).")
    return p


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 (2048-d pool3 features) from the local weights file."""
    weights = inception_weights_path(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("FID needs torch-fidelity: pip install 'latent-ndm[eval]'") from e
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                       feature_extractor_weights_path=str(weights)).to(device)


@torch.no_grad()
def inception_features(images: Tensor, extractor: torch.nn.Module, batch_size: int = 64) -> Tensor:
    """2048-d features, float64 [N, 2048], of uint8 images [N, 1 or 3, H, W] (grey repeated to RGB;
    the extractor resizes to 299x299 itself, as TensorFlow's graph did)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out.append(extractor(x)[0].to("cpu", torch.float64))
    return torch.cat(out)


def fid(images_a: Tensor, images_b: Tensor, weights: str | Path | None = None, device: str | torch.device = "cpu",
        batch_size: int = 64) -> float:
    """FID between two sets of uint8 images [N, C, H, W] with the Inception weights from a local file
    (weights, else $LATENT_NDM_INCEPTION_WEIGHTS)."""
    extractor = load_inception(weights, device)
    return frechet_distance(inception_features(images_a, extractor, batch_size),
                            inception_features(images_b, extractor, batch_size))


def fd_classifier(images_a: Tensor, images_b: Tensor, classifier: ImageClassifier | str | Path) -> float:
    """FD-MNIST: the Frechet distance in the classifier's penultimate features (NOT FID)."""
    clf = classifier if isinstance(classifier, ImageClassifier) else ImageClassifier.from_pretrained(classifier)
    return frechet_distance(clf.features(images_a), clf.features(images_b))


# -- samples of a trained model against its test images -----------------------------------------


def sample_quality(pipe, classifier: ImageClassifier | str | Path | None = None,
                   steps: Sequence[int] = (10, 100, 1000), num_samples: int = 500, sampler: str = "ancestral",
                   seed: int = 0, metrics: Sequence[str] = ("fd_mnist",), inception_weights: str | Path | None = None,
                   batch_size: int = 256, progress: bool = False) -> dict:
    """Sample quality of a pipeline (NDMPipeline, pixel or latent) at several numbers of sampling steps.

    For each steps value: `num_samples` images from `sampler` with torch.Generator seeded by `seed`
    (the same start noise for every setting), their distance to all test images of the run's data for
    each metric ('fd_mnist' needs `classifier`, a model or its directory; 'fid' the Inception weights),
    wall seconds and NFE per batch. 'reference' gives the same distance for num_samples evenly spaced
    train images (a floor: real data of the same count). A discrete model (T steps) skips steps > T.
    """
    from latent_ndm.data.streams import eval_examples

    metrics = list(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        raise ValueError(f"unknown or no metric(s) {sorted(unknown)}; choose from {', '.join(METRICS)}")
    device = pipe.device
    extract: dict[str, Callable[[Tensor], Tensor]] = {}
    report: dict = {"sampler": sampler, "seed": seed, "num_samples": num_samples, "definitions": {}}
    if "fd_mnist" in metrics:
        if classifier is None:
            raise ValueError("fd_mnist needs a classifier directory (scripts/train_classifier.sh writes one)")
        report["classifier"] = None if isinstance(classifier, ImageClassifier) else str(classifier)
        clf = classifier if isinstance(classifier, ImageClassifier) else ImageClassifier.from_pretrained(classifier)
        clf = clf.to(device)
        c = clf.config
        if (c.channels, c.image_size, c.image_size) != tuple(pipe.image_shape):
            raise ValueError(f"the classifier takes {c.channels}x{c.image_size}x{c.image_size} images, the model "
                             f"makes {'x'.join(map(str, pipe.image_shape))}")
        extract["fd_mnist"] = clf.features
    if "fid" in metrics:
        inception = load_inception(inception_weights, device)
        report["inception_weights"] = str(inception_weights_path(inception_weights))
        extract["fid"] = lambda images: inception_features(images, inception)
    report["definitions"] = {m: DEFINITIONS[m] for m in metrics}

    test, _, _ = eval_examples(pipe.config.data, "test", None, 0, 1)
    train, _, _ = eval_examples(pipe.config.data, "train", num_samples, 0, 1)
    ref = {m: gaussian_stats(fn(test)) for m, fn in extract.items()}
    report["reference"] = {"test_images": len(test), "train_images": len(train),
                           **{f"{m}_train_vs_test": frechet_from_stats(*gaussian_stats(fn(train)), *ref[m])
                              for m, fn in extract.items()}}
    report["steps"] = {}
    max_steps = pipe.ndm.num_steps  # > 0: a discrete model, which samples at most T steps of its own grid
    for n_steps in steps:
        if max_steps and n_steps > max_steps:
            report["steps"][str(n_steps)] = {"skipped": f"the model was trained with T={max_steps}"}
            continue
        t0 = time.perf_counter()
        images = pipe.sample(num_samples, sampler, n_steps, torch.Generator(device).manual_seed(seed), batch_size)
        seconds = time.perf_counter() - t0
        entry = {"seconds": round(seconds, 2), "seconds_per_image": seconds / num_samples, **pipe.last_nfe}
        for m, fn in extract.items():
            entry[m] = frechet_from_stats(*gaussian_stats(fn(images)), *ref[m])
        report["steps"][str(n_steps)] = entry
        if progress:
            print(f"steps={n_steps}: " + ", ".join(f"{m} {entry[m]:.4g}" for m in extract)
                  + f" ({seconds:.1f} s, nfe_xhat {entry['nfe_xhat']})", file=sys.stderr, flush=True)
    return report
