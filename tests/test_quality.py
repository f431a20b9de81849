"""Sample quality: the Frechet distance against closed forms, the MNIST classifier behind FD-MNIST,
FID with a locally written Inception weights file (never downloaded), and the evaluate CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from latent_ndm.cli import main
from latent_ndm.config import load_config
from latent_ndm.data.shards import MANIFEST, read_split
from latent_ndm.data.sources import ImageData
from latent_ndm.data.writer import write_shards
from latent_ndm.evaluation import quality as Q
from latent_ndm.evaluation.classifier import ClassifierConfig, ImageClassifier, train_classifier
from latent_ndm.pipeline import NDMPipeline
from latent_ndm.tasks.pixel import build_pixel_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here: on a 2-core machine shared with other work, two threads spinning for each
    other made this file 3-4x slower (150 s instead of 40 s); the results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the Frechet distance -----------------------------------------------------------------------


def test_frechet_identical_sets_give_zero() -> None:
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    assert Q.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    # Fewer samples than dimensions (singular covariance, as for FID on a few hundred images).
    y = torch.randn(20, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert Q.frechet_distance(y, y) < 1e-6 * Q.gaussian_stats(y)[1].trace()


def test_frechet_of_diagonal_gaussians_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(10, generator=g, dtype=torch.float64) * 4, torch.rand(10, generator=g, dtype=torch.float64)
    want = float((mu1 - mu2).square().sum() + (v1.sqrt() - v2.sqrt()).square().sum())
    assert Q.frechet_from_stats(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(want, rel=1e-10)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    one = Q.frechet_from_stats(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert one == pytest.approx(9.0 + 1.0)


def test_frechet_with_singular_covariances_matches_closed_form() -> None:
    """Covariances that vanish along most directions (fewer samples than dimensions), in a rotated basis: the
    closed form of commuting covariances, |mu1 - mu2|^2 + sum (sqrt a_i - sqrt b_i)^2, to round-off."""
    g = torch.Generator().manual_seed(4)
    d, rank = 64, 5
    v1 = torch.zeros(d, dtype=torch.float64)
    v1[:rank] = torch.rand(rank, generator=g, dtype=torch.float64) * 3 + 0.1
    v2 = torch.rand(d, generator=g, dtype=torch.float64) + 0.05
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s1, s2 = rot @ torch.diag(v1) @ rot.T, rot @ torch.diag(v2) @ rot.T
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    want = float((mu1 - mu2).square().sum() + (v1.sqrt() - v2.sqrt()).square().sum())
    assert Q.frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    # The singular one second: the middle matrix's round-off eigenvalues add terms of order sqrt(eps).
    assert Q.frechet_from_stats(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-8)
    zero = torch.zeros(d, d, dtype=torch.float64)  # a single repeated sample: no spread at all
    assert Q.frechet_from_stats(mu1, zero, mu2, s2) == pytest.approx(float((mu1 - mu2).square().sum() + v2.sum()),
                                                                     rel=1e-10)


def test_frechet_is_invariant_to_rotating_and_shifting_both_sets() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    b = torch.randn(400, 12, generator=g, dtype=torch.float64) * 2 + 0.5
    rot, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    shift = torch.randn(12, generator=g, dtype=torch.float64)
    d = Q.frechet_distance(a, b)
    assert d > 1 and Q.frechet_distance(a @ rot + shift, b @ rot + shift) == pytest.approx(d, rel=1e-9)
    mu, cov = Q.gaussian_stats(a)
    np.testing.assert_allclose(mu.numpy(), a.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-10)
    # The general (non-commuting) case against torch-fidelity's own formula (eigenvalues of S1 S2).
    metric_fid = pytest.importorskip("torch_fidelity.metric_fid")
    stats = [{"mu": m.numpy(), "sigma": s.numpy()} for m, s in (Q.gaussian_stats(a), Q.gaussian_stats(b))]
    theirs = metric_fid.fid_statistics_to_metric(*stats, verbose=False)[metric_fid.KEY_METRIC_FID]
    assert d == pytest.approx(theirs, rel=1e-9)


# -- the classifier behind FD-MNIST ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mnist_shards: Path) -> tuple[Path, dict]:
    """A briefly trained classifier: 100 steps of 32 images (3,200 images seen), saved."""
    out = tmp_path_factory.mktemp("clf") / "mnist_classifier"
    _, report = train_classifier(mnist_shards, out, steps=100, batch_size=32, lr=3e-3, num_workers=0, progress=False)
    return out, report


def test_short_training_is_clearly_above_chance_and_saves(trained: tuple[Path, dict]) -> None:
    out, report = trained
    assert report["test_images"] == 500 and report["train_images"] == 4500
    assert report["test_accuracy"] > 0.6  # chance is 0.1
    assert json.loads((out / "report.json").read_text())["test_accuracy"] == report["test_accuracy"]


def test_legibility_share_and_class_entropy(trained: tuple[Path, dict], mnist_shards: Path) -> None:
    from latent_ndm.evaluation.classifier import legibility

    clf = ImageClassifier.from_pretrained(trained[0])
    test = torch.from_numpy(read_split(mnist_shards, "test").images)  # 50 of each class
    probs = clf.probabilities(test)
    real = legibility(clf, test)
    assert real["legible_share"] == pytest.approx((probs.max(-1).values >= 0.9).double().mean().item())
    counts = torch.bincount(probs.argmax(-1), minlength=10).double()
    p = counts[counts > 0] / counts.sum()
    assert real["class_entropy_bits"] == pytest.approx(-(p * p.log2()).sum().item())
    assert 3.0 < real["class_entropy_bits"] <= math.log2(10) + 1e-12  # balanced test set, mostly right
    ones = test[torch.from_numpy(read_split(mnist_shards, "test").labels) == 1]
    assert legibility(clf, ones)["class_entropy_bits"] < 1.0  # one class: little diversity
    noise = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert legibility(clf, noise)["legible_share"] < real["legible_share"]


def test_classifier_save_load_round_trip_gives_identical_features(tmp_path: Path, mnist_shards: Path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ImageClassifier(ClassifierConfig(widths=(4, 8), feature_dim=16))
    images = torch.from_numpy(read_split(mnist_shards, "test").images[:32])
    again = ImageClassifier.from_pretrained(model.save_pretrained(tmp_path / "c"))
    assert again.config == model.config
    f1, f2 = model.features(images), again.features(images)
    assert f1.shape == (32, 16) and torch.equal(f1, f2)
    with pytest.raises(FileNotFoundError, match="train_classifier.sh"):
        ImageClassifier.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        model.features(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_fd_mnist_is_zero_for_the_same_set_and_large_for_noise(trained: tuple[Path, dict], mnist_shards: Path) -> None:
    clf = ImageClassifier.from_pretrained(trained[0])
    test = torch.from_numpy(read_split(mnist_shards, "test").images)
    train = torch.from_numpy(read_split(mnist_shards, "train").images[:500])
    noise = torch.randint(0, 256, test.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    floor = Q.fd_classifier(train, test, clf)
    assert Q.fd_classifier(test, test, clf) == pytest.approx(0.0, abs=1e-6)
    assert 0 < floor and Q.fd_classifier(noise, test, clf) > 20 * floor


# -- the evaluate CLI on a tiny untrained pixel model ---------------------------------------------


def tiny_pixel_model(tmp_path: Path, shards: Path, *overrides: str) -> Path:
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]",
                                                                             "groups=4")]
    cfg = load_config("configs/ndm_mnist.yaml", [f"data.shards={shards}", *nets, *overrides])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_pixel_model(cfg)
    return NDMPipeline(model, (1, 28, 28), cfg).save_pretrained(tmp_path / "model")


@pytest.mark.slow  # an end-to-end command-line run
def test_cli_fd_mnist_report(trained: tuple[Path, dict], mnist_shards: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    model = tiny_pixel_model(tmp_path, mnist_shards, "model.num_steps=3")  # discrete: steps > 3 are skipped
    out = tmp_path / "q.json"
    assert main(["evaluate", str(model), "--metrics", "fd_mnist", "--classifier", str(trained[0]),
                 "--sample-steps", "1,3,10", "--num-samples", "12", "--out", str(out),
                 "--save-samples", str(tmp_path / "saved")]) == 0
    q = json.loads(out.read_text())["sample_quality"]
    # The figures' samples are saved as sample.sh writes them: the same images for the same seed and steps.
    assert sorted(f.name for f in (tmp_path / "saved").iterdir()) == [
        f"ancestral_steps{s}_seed0.{e}" for s in (1, 3) for e in ("npz", "png")]
    assert main(["sample", str(model), "-n", "12", "--steps", "3", "--out", str(tmp_path / "sampled")]) == 0
    saved, sampled = (np.load(d / "ancestral_steps3_seed0.npz") for d in (tmp_path / "saved", tmp_path / "sampled"))
    assert saved["images"].shape == (12, 1, 28, 28) and np.array_equal(saved["images"], sampled["images"])
    assert "NOT FID" in q["definitions"]["fd_mnist"] and q["num_samples"] == 12 and q["sampler"] == "ancestral"
    assert q["reference"]["test_images"] == 500 and q["reference"]["train_images"] == 12
    assert q["reference"]["fd_mnist_train_vs_test"] > 0
    assert set(q["steps"]) == {"1", "3", "10"} and "skipped" in q["steps"]["10"]
    for steps in ("1", "3"):
        entry = q["steps"][steps]
        assert entry["nfe_xhat"] == int(steps) == entry["nfe_f"] and entry["seconds"] >= 0
        assert math.isfinite(entry["fd_mnist"]) and entry["fd_mnist"] > q["reference"]["fd_mnist_train_vs_test"]
        assert 0 <= entry["legibility"]["legible_share"] <= 1 and entry["legibility"]["num_images"] == 12
    capsys.readouterr()
    assert main(["evaluate", str(model), "--metrics", "fd_mnist", "--classifier", str(tmp_path / "none")]) == 1
    assert "train_classifier.sh" in capsys.readouterr().err
    assert main(["evaluate", str(model), "--metrics", "fid", "--inception-weights", str(tmp_path / "none.pth")]) == 1
    assert Q.INCEPTION_FILE in capsys.readouterr().err


# -- FID: the Inception weights come from a local file --------------------------------------------


def test_missing_inception_file_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(Q.INCEPTION_ENV, raising=False)
    for given in (None, tmp_path / "missing.pth", tmp_path):  # nothing; a missing file; a folder without it
        with pytest.raises(FileNotFoundError) as err:
            Q.inception_weights_path(given)
        assert Q.INCEPTION_FILE in str(err.value) and Q.INCEPTION_URL in str(err.value)
        assert Q.INCEPTION_ENV in str(err.value)
    (tmp_path / Q.INCEPTION_FILE).write_bytes(b"")
    monkeypatch.setenv(Q.INCEPTION_ENV, str(tmp_path))  # a folder holding the file
    assert Q.inception_weights_path() == tmp_path / Q.INCEPTION_FILE


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised state dict of torch-fidelity's Inception in the format of the real file
    (torch.save of the state dict), convolutions initialised to keep activations O(1)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        # The constructor always loads weights: give it none, keep the random initialisation.
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / Q.INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


def test_fid_reads_the_local_file_and_equals_the_frechet_distance_of_its_features(inception_file: Path) -> None:
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 1, 28, 28), generator=g, dtype=torch.uint8)  # grey: repeated to RGB
    b = (a.float() * 0.5).to(torch.uint8)
    extractor = fe.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        fa, fb = (extractor(x.repeat(1, 3, 1, 1))[0].double() for x in (a, b))
    assert fa.shape == (3, 2048) and fa.std() > 1e-3  # features of a usable scale
    want = Q.frechet_distance(fa, fb)
    assert want > 0 and Q.fid(a, b, inception_file) == pytest.approx(want, rel=1e-6)
    assert Q.fid(a, a, inception_file) < 1e-6 * want


def test_kid_equals_torch_fidelity() -> None:
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 16, generator=g), torch.randn(50, 16, generator=g) * 1.2 + 0.3
    theirs = metric_kid.kid_features_to_metric(a, b, kid_subsets=7, kid_subset_size=40, rng_seed=3, verbose=False,
                                               kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                               kid_kernel_poly_coef0=1)
    mean, std = Q.kid(a, b, subsets=7, subset_size=40, seed=3)  # the same subsets; theirs in float32, ours float64
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)


def test_fid_and_kid_against_cached_training_statistics(inception_file: Path, mnist_shards: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A few MNIST images as their own shards, so the Inception passes stay few (train 5, test 3, samples 4).
    manifest = {"source": "test", "splits": {}}
    for split, n in (("train", 5), ("test", 3)):
        data = read_split(mnist_shards, split)
        manifest["splits"][split] = write_shards(ImageData(data.images[:n], data.labels[:n]), tmp_path / "few", split,
                                                 maxcount=2)
    (tmp_path / "few" / MANIFEST).write_text(json.dumps(manifest))
    pipe = NDMPipeline.from_pretrained(tiny_pixel_model(tmp_path, tmp_path / "few"))
    q = Q.sample_quality(pipe, None, steps=(1,), num_samples=4, metrics=("fid", "kid"),
                         inception_weights=inception_file, batch_size=3)
    assert q["inception_weights"] == str(inception_file) and "Inception" in q["definitions"]["fid"]
    ref = q["reference"]
    assert ref["against"] == "all 5 training images" and not ref["stats_cached"] and ref["inception_test_images"] == 3
    assert q["num_samples"] == 4 and q["sampler"] == "ancestral" and q["steps"]["1"]["nfe_xhat"] == 1
    # The streamed, cached statistics are those of the training images' features computed at once.
    extractor = Q.load_inception(inception_file)
    train_feats = Q.inception_features(torch.from_numpy(read_split(tmp_path / "few", "train").images), extractor)
    mu, cov = Q.gaussian_stats(train_feats)
    with np.load(ref["stats_file"]) as f:
        np.testing.assert_allclose(f["mu"], mu.numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(f["sigma"], cov.numpy(), rtol=1e-5, atol=1e-8)
        assert int(f["count"]) == 5 and f["kid_features"].shape == (5, 2048)
    samples = pipe.sample(4, "ancestral", 1, None, 3, seed=0)
    feats = Q.inception_features(samples, extractor)
    assert q["steps"]["1"]["fid"] == pytest.approx(Q.frechet_from_stats(*Q.gaussian_stats(feats), mu, cov), rel=1e-6)
    assert q["steps"]["1"]["kid"] == pytest.approx(Q.kid(feats, train_feats, seed=0)[0], rel=1e-6)
    # The command line (the example of the README with a tiny N), a second evaluation: from the cached statistics.
    assert main(["evaluate", str(tmp_path / "model"), "--metrics", "fid,kid", "--num-samples", "4", "--sample-steps",
                 "1", "--sample-batch-size", "3", "--inception-weights", str(inception_file), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)["sample_quality"]
    assert report["reference"]["stats_cached"] and report["reference"]["stats_file"] == ref["stats_file"]
    assert all(report["steps"]["1"][m] == q["steps"]["1"][m] for m in ("fid", "kid"))
    with pytest.raises(ValueError, match="needs a classifier"):
        Q.sample_quality(pipe, None, steps=(1,), num_samples=2)
