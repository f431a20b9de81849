"""Sample quality: Frechet distances between Gaussians fitted to features of two image sets.

- FID and KID: features from the standard Inception-v3 (torch-fidelity's port of the TensorFlow 2015-12-05
  graph, pool3, 2048-d) of N samples (default 50,000) against the statistics of the TRAINING images,
  computed once per shard set and cached beside the shards (the papers' FID-50k protocol); weights
  read from a local file (`pip install 'latent-ndm[eval]'`). Nothing is
  downloaded: give the path of `weights-inception-2015-12-05-6726825d.pth` (from INCEPTION_URL) as an
  argument or in $LATENT_NDM_INCEPTION_WEIGHTS.
- FD-MNIST: the same distance in the 128-d penultimate features of the project's own MNIST
  classifier (latent_ndm.evaluation.classifier, scripts/train_classifier.sh). NOT FID: its values depend on
  that classifier and compare only with each other.

    sample_quality(pipe, "runs/mnist_classifier", steps=(10, 100, 1000), num_samples=500)   # -> dict (JSON)

FID and FD-MNIST are biased upwards for finite sets (more so with fewer images than feature dimensions):
compare numbers computed from the same number of images (KID is unbiased); the report gives real images
not trained on as a floor.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from latent_ndm.evaluation.classifier import ImageClassifier, legibility
from latent_ndm.training.checkpoint import sha256_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"  # docs only
INCEPTION_ENV = "LATENT_NDM_INCEPTION_WEIGHTS"
METRICS = ("fd_mnist", "fid", "kid")
DEFINITIONS = {
    "fd_mnist": "Frechet distance between Gaussians fitted to the 128-d penultimate features of the project's MNIST "
                "classifier (scripts/train_classifier.sh); NOT FID, comparable only for the same classifier",
    "fid": "Frechet Inception distance: torch-fidelity's Inception-v3 (TF 2015-12-05 weights), 2048-d pool3 features, "
           "samples against all training images",
    "kid": "Kernel Inception distance: unbiased MMD^2, cubic polynomial kernel, 100 subsets of 1000 (torch-fidelity's "
           "defaults), the same features, samples against 10,000 evenly spaced training images",
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


def _above_round_off(evals: Tensor) -> Tensor:
    """Which eigenvalues of a symmetric PSD matrix exceed its round-off floor, D eps max (the rest are 0 in exact
    arithmetic or below what float64 resolves)."""
    if evals.numel() == 0:
        return evals > 0
    return evals > evals.max().clamp_min(0) * len(evals) * torch.finfo(evals.dtype).eps


def frechet_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2):
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64.

    With S1 = V L V^T, the middle matrix S1^1/2 S2 S1^1/2 has the eigenvalues of L^1/2 V^T S2 V L^1/2, which is
    symmetric PSD: its square root's trace is the sum of the square roots of its (clipped) eigenvalues, with no
    complex round-off as with scipy's sqrtm of the non-symmetric S1 S2. Directions where S1 vanishes (eigenvalues
    below its round-off floor: a covariance of fewer samples than dimensions) are left out, as they contribute
    nothing in exact arithmetic and only sqrt(round-off) otherwise; one eigendecomposition then does the work."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(v).to("cpu", torch.float64) for v in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: {tuple(mu1.shape)}, {tuple(cov1.shape)} vs "
                         f"{tuple(mu2.shape)}, {tuple(cov2.shape)}")
    evals, evecs = torch.linalg.eigh((cov1 + cov1.T) / 2)
    keep = _above_round_off(evals)
    v, root = evecs[:, keep], evals[keep].sqrt()
    middle = root[:, None] * (v.T @ cov2 @ v) * root[None, :]
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


# -- KID ----------------------------------------------------------------------------------------


def kid(features_a: Tensor, features_b: Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) as torch-fidelity computes it: the unbiased MMD^2
    with the polynomial kernel k(x, y) = (x.y / D + 1)^3 between random subsets (`subsets` pairs of
    `subset_size`, drawn by numpy's RandomState(seed)); (mean, std) over the subsets. Unlike FID it has
    an unbiased estimator, so values from different set sizes compare."""
    import numpy as np

    fa, fb = (torch.as_tensor(f).to("cpu", torch.float64).numpy() for f in (features_a, features_b))
    m = min(subset_size, len(fa), len(fb))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(fa)} and {len(fb)}")
    rng, d = np.random.RandomState(seed), fa.shape[1]
    mmds = []
    for _ in range(subsets):
        x, y = fa[rng.choice(len(fa), m, replace=False)], fb[rng.choice(len(fb), m, replace=False)]
        kxx, kyy, kxy = ((u @ v.T / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        mmds.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(mmds)), float(np.std(mmds))


# -- training-set statistics, computed once per shard set -----------------------------------------

KID_POOL = 10_000  # training features kept for KID (evenly spaced ids)


def _shard_fingerprint(data) -> str:
    """What the train images are: the manifest (or another tool's shard index) and the image shape."""
    from latent_ndm.data.shards import INDEX, MANIFEST

    folder = Path(data.shards)
    h = hashlib.sha256(f"{data.channels}x{data.image_size}|{data.train_urls}".encode())
    for name in (MANIFEST, INDEX):
        if (folder / name).is_file():
            h.update((folder / name).read_bytes())
    return h.hexdigest()


def _gather(obj):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]


def reference_statistics(data, name: str, extract: Callable[[Tensor], Tensor], extractor_digest: str,
                         batch_size: int = 250, progress: bool = False) -> dict:
    """Mean and covariance of the features of every TRAINING image (the reference papers use for FID), and
    KID_POOL of them for KID, streamed over the train shards (each process its share, summed), cached in
    SHARDS/reference_stats/ under a key of the shards and the feature extractor: computed once per shard set."""
    import numpy as np

    from latent_ndm.data.shards import ReadStats, iterate_split
    from latent_ndm.data.streams import open_split, process_group, share_of_split

    key = hashlib.sha256(f"{_shard_fingerprint(data)}|{name}|{extractor_digest}".encode()).hexdigest()[:16]
    folder = Path(data.shards) if Path(data.shards).is_dir() else Path(data.shards).parent
    path = folder / "reference_stats" / f"train_{name}_{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {"mu": torch.from_numpy(f["mu"]), "sigma": torch.from_numpy(f["sigma"]), "count": int(f["count"]),
                    "kid_features": torch.from_numpy(f["kid_features"]), "path": str(path), "cached": True}
    shards = open_split(data, "train")
    rank, world = process_group()
    keep_shard, keep = share_of_split(len(shards.urls), rank, world)
    stride = max(1, shards.count // KID_POOL)
    n, total, outer, pool = 0, None, None, {}
    batch: list[Tensor] = []
    ids: list[int] = []

    def flush() -> None:
        nonlocal n, total, outer
        feats = extract(torch.stack(batch)).double()
        total = feats.sum(0) if total is None else total + feats.sum(0)
        outer = feats.T @ feats if outer is None else outer + feats.T @ feats
        n += len(feats)
        pool.update({i: f.float() for i, f in zip(ids, feats) if i % stride == 0})
        batch.clear()
        ids.clear()

    bar = tqdm(total=shards.count // world, desc=f"{name} statistics of the train images", disable=not progress)
    for image, _, i in iterate_split(shards, ReadStats(data.strict), keep_shard, keep):
        batch.append(image)
        ids.append(i)
        bar.update()
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    parts = _gather((n, total, outer, pool))
    n = sum(p[0] for p in parts)
    total = sum(p[1] for p in parts if p[1] is not None)
    outer = sum(p[2] for p in parts if p[2] is not None)
    pool = {i: f for p in parts for i, f in p[3].items()}
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)  # unbiased, as gaussian_stats
    kid_features = torch.stack([pool[i] for i in sorted(pool)])
    out = {"mu": mu, "sigma": sigma, "count": n, "kid_features": kid_features, "path": str(path), "cached": False}
    if rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.npz")
            np.savez(tmp, mu=mu.numpy(), sigma=sigma.numpy(), count=n, kid_features=kid_features.numpy())
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"cannot cache the reference statistics in {path.parent} ({e}); they will be computed "
                          "again next time", stacklevel=2)
    return out


def shared_features(images: Tensor, extract: Callable[[Tensor], Tensor]) -> Tensor:
    """Features of all `images` (held by every process), each process extracting every W-th one; all get
    the features in order."""
    from latent_ndm.data.streams import process_group

    rank, world = process_group()
    mine = extract(images[rank::world]) if len(images[rank::world]) else None
    parts = _gather(mine)
    out = torch.empty((len(images), next(p for p in parts if p is not None).shape[1]), dtype=torch.float64)
    for r, part in enumerate(parts):
        if part is not None:
            out[r::world] = part
    return out


# -- samples of a trained model ------------------------------------------------------------------


def sample_quality(pipe, classifier: ImageClassifier | str | Path | None = None,
                   steps: Sequence[int] = (10, 100, 1000), num_samples: int | None = None,
                   sampler: str = "ancestral", seed: int = 0, metrics: Sequence[str] = ("fd_mnist",),
                   inception_weights: str | Path | None = None, batch_size: int = 256,
                   progress: bool = False, on_images: Callable[[int, Tensor, dict], object] | None = None,
                   temperature: float = 1.0, guide=None, guidance: float = 2.0) -> dict:
    """Sample quality of a pipeline (NDMPipeline, pixel or latent) at several numbers of sampling steps.

    For each steps value, `num_samples` images from `sampler` (default 50,000 for fid/kid, 500 for fd_mnist),
    each batch of batch_size keyed by (seed, batch): the same images for any number of processes (under
    torchrun the processes share the sampling and the feature extraction).
    - 'fid' / 'kid': against the statistics of ALL TRAINING images (the papers' protocol, e.g. FID-50k),
      computed once per shard set and cached beside the shards; 'reference' gives the same distances for
      min(num_samples, test size) evenly spaced test images (real data not trained on: a floor).
    - 'fd_mnist': against the test images, in the features of the project's MNIST classifier (NOT FID;
      offline); 'reference' gives num_samples evenly spaced train images against them.
    guide / guidance: autoguidance (NDMPipeline.sample), recorded as the weight ("guidance": null without a guide).
    The report records N, the reference set, the sampler, its temperature, the steps and the seed. A discrete
    model (T steps) skips steps > T. on_images(steps, images, nfe), when given, receives each setting's
    samples (e.g. to save them: the figures and the pictures then come from the same images).
    """
    from latent_ndm.data.streams import eval_examples

    metrics = list(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        raise ValueError(f"unknown or no metric(s) {sorted(unknown)}; choose from {', '.join(METRICS)}")
    inception_metrics = [m for m in metrics if m in ("fid", "kid")]
    num_samples = num_samples or (50_000 if inception_metrics else 500)
    device = pipe.device
    report: dict = {"sampler": sampler, "temperature": temperature,
                    "guidance": None if guide is None else guidance, "seed": seed, "num_samples": num_samples,
                    "sample_batch_size": batch_size,
                    "definitions": {m: DEFINITIONS[m] for m in metrics}, "reference": {}}
    clf_features = None
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
        clf_features = clf.features
        test, _, _ = eval_examples(pipe.config.data, "test", None, 0, 1)
        train, _, _ = eval_examples(pipe.config.data, "train", num_samples, 0, 1)
        clf_ref = gaussian_stats(clf_features(test))
        report["reference"] |= {"fd_mnist_against": f"all {len(test)} test images", "test_images": len(test),
                                "train_images": len(train), "test_legibility": legibility(clf, test),
                                "fd_mnist_train_vs_test": frechet_from_stats(*gaussian_stats(clf_features(train)),
                                                                             *clf_ref)}
    if inception_metrics:
        inception = load_inception(inception_weights, device)
        weights = inception_weights_path(inception_weights)
        report["inception_weights"] = str(weights)

        def incep(images: Tensor) -> Tensor:
            return inception_features(images, inception)

        ref = reference_statistics(pipe.config.data, "inception2048", incep, sha256_file(weights), progress=progress)
        test, _, _ = eval_examples(pipe.config.data, "test", num_samples, 0, 1)
        test_feats = shared_features(test, incep)
        report["reference"] |= {"against": f"all {ref['count']} training images", "stats_file": ref["path"],
                                "stats_cached": ref["cached"], "inception_test_images": len(test),
                                "kid_pool": len(ref["kid_features"])}
        if "fid" in metrics:
            report["reference"]["fid_test_vs_train"] = frechet_from_stats(*gaussian_stats(test_feats), ref["mu"],
                                                                          ref["sigma"])
        if "kid" in metrics:
            report["reference"]["kid_test_vs_train"] = kid(test_feats, ref["kid_features"], seed=seed)[0]
    report["steps"] = {}
    max_steps = pipe.ndm.num_steps  # > 0: a discrete model, which samples at most T steps of its own grid
    for n_steps in steps:
        if max_steps and n_steps > max_steps:
            report["steps"][str(n_steps)] = {"skipped": f"the model was trained with T={max_steps}"}
            continue
        t0 = time.perf_counter()
        images = pipe.sample(num_samples, sampler, n_steps, None, batch_size, seed=seed, temperature=temperature,
                             guide=guide, guidance=guidance)
        seconds = time.perf_counter() - t0
        entry = {"seconds": round(seconds, 2), "seconds_per_image": seconds / num_samples, **pipe.last_nfe}
        if on_images is not None:
            on_images(n_steps, images, dict(pipe.last_nfe))
        if clf_features is not None:
            entry["fd_mnist"] = frechet_from_stats(*gaussian_stats(clf_features(images)), *clf_ref)
            entry["legibility"] = legibility(clf, images)
        if inception_metrics:
            feats = shared_features(images, incep)
            if "fid" in metrics:
                entry["fid"] = frechet_from_stats(*gaussian_stats(feats), ref["mu"], ref["sigma"])
            if "kid" in metrics:
                entry["kid"], entry["kid_std"] = kid(feats, ref["kid_features"], seed=seed)
        report["steps"][str(n_steps)] = entry
        if progress:
            print(f"steps={n_steps}: " + ", ".join(f"{m} {entry[m]:.4g}" for m in metrics)
                  + f" ({seconds:.1f} s, nfe_xhat {entry['nfe_xhat']})", file=sys.stderr, flush=True)
    return report
