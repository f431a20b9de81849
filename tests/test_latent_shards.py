"""Stage 2 on pre-encoded latents: the stored posteriors, the same terms as encoding on the fly, a run, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latent_ndm.config import ConfigError, LatentRunConfig, load_config
from latent_ndm.data.latent_shards import open_latent_shards
from latent_ndm.data.shards import ReadStats, iterate_split, load_manifest, read_split, shard_samples, split_shards
from latent_ndm.data.streams import train_batches
from latent_ndm.nets.build import build_loss
from latent_ndm.tasks.latent import build_latent_model, latent_task
from latent_ndm.training.loop import train
from vae.config import VAEConfig
from vae.model import VAE

TINY_VAE = VAEConfig(in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=2, groups=4, num_mixtures=2)
NETS = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "groups=4")]


def _save_vae(path: Path, seed: int, images) -> Path:
    torch.manual_seed(seed)
    vae = VAE(TINY_VAE)
    vae.fit_latent_stats([VAE.from_uint8(torch.from_numpy(images))])  # a non-trivial normalisation
    return vae.save_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, mnist_shards: Path) -> dict:
    """A tiny VAE, the MNIST train split encoded with it through the CLI, and a second VAE."""
    from latent_ndm.cli import main

    root = tmp_path_factory.mktemp("latents")
    data = read_split(mnist_shards, "train")
    vae_dir = _save_vae(root / "vae", 0, data.images[:256])
    other_dir = _save_vae(root / "other", 1, data.images[:256])
    assert main(["encode_latents", str(vae_dir), str(mnist_shards), str(root / "z"), "--batch-size", "300"]) == 0
    return {"vae": vae_dir, "other": other_dir, "latents": root / "z", "images": data.images, "labels": data.labels}


def _cfg(tmp_path: Path, setup: dict, shards: Path, *extra: str) -> LatentRunConfig:
    return load_config("configs/latent_ndm_mnist.yaml", [
        f"out_dir={tmp_path}", "name=l", f"vae_path={setup['vae']}", f"data.shards={shards}",
        f"latents={setup['latents']}", "data.num_workers=0", "data.lanes=2", *NETS, *extra], schema=LatentRunConfig)


def test_the_stored_posteriors_are_the_vaes_in_the_source_layout(setup: dict, mnist_shards: Path) -> None:
    manifest = load_manifest(setup["latents"])
    source = load_manifest(mnist_shards)["splits"]["train"]
    train = manifest["splits"]["train"]
    assert manifest["latent_shape"] == [2, 14, 14] and manifest["image_shape"] == [1, 28, 28]
    assert train["shape"] == [4, 14, 14] and train["dtype"] == "float32"
    assert train["shards"] == source["shards"] and train["shard_counts"] == source["shard_counts"]
    # The same keys in the same order in every shard: ids (positions) and labels carry over.
    latents = split_shards(setup["latents"], "train")
    for url, src in zip(latents.urls, split_shards(mnist_shards, "train").urls):
        assert [s["__key__"] for s in shard_samples(url, ReadStats())] == \
            [s["__key__"] for s in shard_samples(src, ReadStats())]
    items = list(iterate_split(latents, ReadStats(strict=True)))
    params = torch.stack([p for p, _, _ in items])  # [N, 4, 14, 14]
    assert [i for _, _, i in items] == list(range(4500))
    assert [y for _, y, _ in items] == setup["labels"].tolist()
    # Independently: the VAE's normalised posterior of the same images, in other batches.
    vae = VAE.from_pretrained(setup["vae"])
    pick = torch.arange(0, 4500, 37)
    with torch.no_grad():
        q = vae.posterior(VAE.from_uint8(torch.from_numpy(setup["images"][pick.numpy()])))
    torch.testing.assert_close(params[pick, :2], q.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(params[pick, 2:], q.logvar, rtol=1e-5, atol=1e-5)


def test_pre_encoded_batches_give_the_on_the_fly_terms(tmp_path: Path, setup: dict, mnist_shards: Path) -> None:
    cfg = _cfg(tmp_path, setup, mnist_shards)
    model = build_latent_model(cfg).eval()
    loss = build_loss(cfg.model).eval()  # eval: uniform t, as the model's own loss evaluates
    latents = open_latent_shards(cfg.latents, model.codec.vae, (1, 28, 28), mnist_shards)
    # The same lane stream over images and over their posteriors: the same examples at the same steps.
    images = train_batches(cfg.data, 8, seed=5, start_step=3)
    params = train_batches(cfg.data, 8, seed=5, start_step=3, shards=latents)
    for step in (3, 4):
        a, b = next(images), next(params)
        assert torch.equal(a.ids, b.ids) and b.images.dtype == torch.float32 and b.images.shape == (8, 4, 14, 14)
        with torch.no_grad():
            fly = model.nelbo_terms(a.images, a.noise(5, step, torch.device("cpu")), loss)
            pre = model.nelbo_terms(b.images, b.noise(5, step, torch.device("cpu")), loss)
        assert set(fly) == {"decoder", "log_q", "rec", "diff", "prior"}
        assert set(pre) == set(fly) - {"decoder"}
        for k, v in pre.items():
            torch.testing.assert_close(v, fly[k], rtol=1e-4, atol=1e-3, msg=k)


def test_stage_two_trains_on_pre_encoded_latents(tmp_path: Path, setup: dict, mnist_shards: Path) -> None:
    cfg = _cfg(tmp_path, setup, mnist_shards, "train.steps=3", "train.batch_size=8", "train.log_every=1",
               "train.eval_every=0", "train.sample_every=0", "train.ckpt_every=3", "eval.final_examples=40")
    task = latent_task(cfg)
    vae_before = {k: v.clone() for k, v in task.model.codec.vae.state_dict().items()}
    ndm_before = {k: v.clone() for k, v in task.model.ndm.state_dict().items()}
    run_dir = train(cfg, task)
    assert all(torch.equal(v, vae_before[k]) for k, v in task.model.codec.vae.state_dict().items())
    assert any(not torch.equal(v, ndm_before[k]) for k, v in task.model.ndm.state_dict().items())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("prior_nelbo_bpd" in r and "log_q_bpd" in r and "bpd" not in r for r in rows)
    r = rows[-1]
    assert r["loss"] == pytest.approx(r["prior_nelbo_bpd"] + r["log_q_bpd"], rel=1e-5)
    assert r["prior_nelbo_bpd"] == pytest.approx(r["rec_bpd"] + r["diff_bpd"] + r["prior_bpd"], rel=1e-5)
    report = json.loads((run_dir / "test_report.json").read_text())["nelbo"]  # the full model, through the VAE
    assert report["num_images"] == 40 and "decoder_bpd" in report


def test_other_vaes_data_and_stages_are_refused(tmp_path: Path, setup: dict, mnist_shards: Path) -> None:
    with pytest.raises(ValueError, match="another VAE"):
        latent_task(_cfg(tmp_path, setup, mnist_shards, f"vae_path={setup['other']}"))
    vae = VAE.from_pretrained(setup["vae"])
    with pytest.raises(ValueError, match="no pre-encoded latents"):
        open_latent_shards(mnist_shards, vae, (1, 28, 28))
    with pytest.raises(ValueError, match="28, 28"):
        open_latent_shards(setup["latents"], vae, (1, 32, 32))
    with pytest.raises(ConfigError, match="stage=prior"):
        _cfg(tmp_path, setup, mnist_shards, "stage=joint")
    with pytest.raises(ConfigError, match="hflip"):
        _cfg(tmp_path, setup, mnist_shards, "data.hflip=true")
