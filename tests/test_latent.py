"""The latent model: the joint bound against the VAE's own, and stage 2 on a frozen VAE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from latent_ndm.config import LatentRunConfig, load_config
from latent_ndm.core.codec import LatentCodec
from latent_ndm.core.noise import Noise
from latent_ndm.tasks.latent import latent_task
from latent_ndm.training.loop import train
from vae.config import VAEConfig
from vae.model import VAE

TINY_VAE = VAEConfig(in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=2, groups=4, num_mixtures=2)


def _standard_normal_prior(codec: LatentCodec, images: torch.Tensor, noise: Noise) -> dict[str, torch.Tensor]:
    """The joint bound's terms with p(z0) = N(0, I) in the NDM's place: the codec's terms of its z0 and
    'prior' = -log N(z0; 0, I), in nats [B]."""
    z0, terms = codec.encode(images, noise)
    nll = 0.5 * (z0.double().square() + math.log(2 * math.pi)).flatten(1).sum(1)
    return {k: v.double() for k, v in terms.items()} | {"prior": nll}


def test_joint_bound_with_a_standard_normal_prior_is_the_vaes_own_nelbo() -> None:
    torch.manual_seed(0)
    vae = VAE(TINY_VAE).eval()
    codec = LatentCodec(vae)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    ids = [4, 9, 11]
    with torch.no_grad():
        terms = _standard_normal_prior(codec, images, Noise.per_example(ids, "cpu", 0, "t"))
        assert set(terms) == {"decoder", "log_q", "prior"}
        assert all(v.shape == (3,) for v in terms.values())
        # Independently: the same z0 (same keyed draws), the VAE's decoder, log q and log N(z0; 0, I).
        x = VAE.from_uint8(images)
        q = vae.posterior_raw(x)
        eps = Noise.per_example(ids, "cpu", 0, "t").normal(q.mean)
        z = q.mean + q.std * eps
        rec = vae.likelihood.nll(vae.decoder_output(z), x)
        log_q = torch.distributions.Normal(q.mean, q.std).log_prob(z).flatten(1).sum(1)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
        torch.testing.assert_close(sum(terms.values()), (rec + log_q - log_p).double(), rtol=1e-5, atol=1e-3)
        # In expectation over z0, log q - log p is the analytic KL of the VAE's own NELBO.
        n = 4000
        many = _standard_normal_prior(codec, images.repeat(n, 1, 1, 1),
                                      Noise.from_generator(torch.Generator().manual_seed(1), 3 * n))
        draws = (many["log_q"] + many["prior"]).view(n, 3)
    se = draws.std(0) / math.sqrt(n)
    assert ((draws.mean(0) - q.kl().double()).abs() < 4 * se + 1e-3).all(), (draws.mean(0), q.kl())


def test_latent_codec_round_trips_through_the_stored_normalisation() -> None:
    torch.manual_seed(0)
    vae = VAE(TINY_VAE).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    vae.fit_latent_stats([VAE.from_uint8(images)])
    codec = LatentCodec(vae)
    with torch.no_grad():
        z = vae.encode(VAE.from_uint8(images)).mean
        raw = vae.posterior_raw(VAE.from_uint8(images)).mean
        shape = (1, -1, 1, 1)
        torch.testing.assert_close(z * vae.latent_scale.view(shape) + vae.latent_shift.view(shape), raw)
        decoded = codec.decode(z)
    assert decoded.dtype == torch.uint8 and decoded.shape == images.shape


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = VAE(TINY_VAE)
    return vae.save_pretrained(tmp_path_factory.mktemp("vae") / "vae")


def test_stage_two_trains_the_prior_and_leaves_the_vae_unchanged(tmp_path: Path, tiny_vae_dir: Path,
                                                                  mnist_shards: Path) -> None:
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "groups=4")]
    cfg = load_config("configs/latent_ndm_mnist.yaml", [
        f"out_dir={tmp_path}", "name=l", f"vae_path={tiny_vae_dir}", f"data.shards={mnist_shards}",
        "data.num_workers=1", "train.steps=40", "train.batch_size=16", "train.warmup_steps=5", "train.log_every=1",
        "train.eval_every=0", "train.sample_every=40", "train.num_samples=4", "train.sample_steps=5",
        "train.ckpt_every=40", "eval.final_examples=100", *nets], schema=LatentRunConfig)
    task = latent_task(cfg)
    vae_before = {k: v.clone() for k, v in task.model.codec.vae.state_dict().items()}
    run_dir = train(cfg, task)
    for k, v in task.model.codec.vae.state_dict().items():
        assert torch.equal(v, vae_before[k]), k
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bpd = [r["bpd"] for r in rows if "bpd" in r]
    assert len(bpd) == 40 and sum(bpd[-5:]) / 5 < sum(bpd[:5]) / 5 - 0.2, bpd
    report = json.loads((run_dir / "test_report.json").read_text())["nelbo"]
    assert report["num_images"] == 100
    assert report["bpd"] == pytest.approx(sum(report[f"{k}_bpd"] for k in ("decoder", "log_q", "rec", "diff", "prior")))
    assert (run_dir / "samples" / "step_00000040.png").is_file()


@pytest.mark.slow  # an end-to-end command-line run
def test_end_to_end_stages_one_to_three_and_sampling_from_the_command_line(tmp_path: Path,
                                                                          mnist_shards: Path) -> None:
    import numpy as np
    from safetensors.torch import load_file

    from latent_ndm.cli import main
    from latent_ndm.pipeline import NDMPipeline
    from latent_ndm.training.checkpoint import latest_checkpoint

    small = ["data.num_workers=0", "train.batch_size=8", "train.eval_every=0", "train.sample_every=0",
             "eval.final_examples=40", f"data.shards={mnist_shards}", f"out_dir={tmp_path}"]
    # Stage 1: the VAE, exported to runs/v/vae with its latent statistics.
    assert main(["train_vae", "configs/vae_mnist.yaml", "name=v", "vae.channels=8", "vae.groups=4",
                 "vae.num_mixtures=2", "train.steps=4", "train.ckpt_every=4", *small]) == 0
    vae_dir = tmp_path / "v" / "vae"
    # Stages 2 and 3 from that VAE.
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "groups=4")]
    assert main(["train_latent", "configs/latent_ndm_mnist.yaml", "name=s", f"vae_path={vae_dir}", "train.steps=8",
                 "train.ckpt_every=8", "model.mixing=true", *nets, *small, "--joint-steps", "4"]) == 0
    two = load_file(latest_checkpoint(tmp_path / "s") / "ema.safetensors")
    three = load_file(latest_checkpoint(tmp_path / "s_joint") / "model.safetensors")
    assert json.loads((tmp_path / "s_joint" / "config.json").read_text())["stage"] == "joint"
    assert torch.equal(two["codec.vae.encoder.conv_in.weight"], load_file(vae_dir / "model.safetensors")[
        "encoder.conv_in.weight"])  # stage 2 left the VAE alone
    assert not torch.equal(two["codec.vae.encoder.conv_in.weight"],
                           three["codec.vae.encoder.conv_in.weight"])  # stage 3 moved it
    for run in ("v", "s", "s_joint"):
        report = json.loads((tmp_path / run / "test_report.json").read_text())
        assert report.get("nelbo", report)["num_images"] == 40 and math.isfinite(report.get("nelbo", report)["bpd"])
    # Sampling the final model: the CLI's .npz equals the Python API's samples for the same seed.
    assert main(["sample", str(tmp_path / "s_joint"), "--num", "4", "--steps", "5", "--seed", "3",
                 "--out", str(tmp_path / "grid")]) == 0
    saved = np.load(tmp_path / "grid" / "ancestral_steps5_seed3.npz")["images"]
    assert (tmp_path / "grid" / "ancestral_steps5_seed3.png").is_file()
    pipe = NDMPipeline.from_pretrained(tmp_path / "s_joint")
    assert pipe.is_latent
    again = pipe.sample(4, "ancestral", 5, seed=3)  # the keyed form the command line uses
    assert saved.dtype == np.uint8 and saved.shape == (4, 1, 28, 28)
    assert torch.equal(torch.from_numpy(saved), again)
