"""The VAE package: shapes for every factor, save/load, clear input errors, and real training on MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latent_ndm.config import ConfigError, VAERunConfig, load_config
from latent_ndm.tasks.vae import vae_task
from latent_ndm.training.checkpoint import latest_checkpoint
from latent_ndm.training.loop import train
from vae.config import VAEConfig
from vae.model import VAE

TINY = dict(channels=8, num_res_blocks=1, latent_channels=3, groups=4, num_mixtures=2)


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
@pytest.mark.parametrize("decoder", ["discrete", "perceptual"])
def test_encode_decode_shapes_for_every_factor(factor: int, decoder: str) -> None:
    mult = (1, 2, 2, 2)[: {1: 1, 2: 2, 4: 3, 8: 4}[factor]]
    vae = VAE(VAEConfig(in_channels=3, channel_mult=mult, decoder=decoder, **TINY)).eval()
    assert vae.factor == factor
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == posterior.std.shape == (2, 3, 16 // factor, 24 // factor)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(z, posterior.sample(torch.Generator().manual_seed(0)))
    y = vae.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_save_and_load_give_bit_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(in_channels=1, channel_mult=(1, 2), **TINY)).eval()
    x = VAE.from_uint8(torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8))
    vae.fit_latent_stats([x, x.flip(0)])
    assert (vae.latent_scale != 1).all() and (vae.latent_shift != 0).all()
    again = VAE.from_pretrained(vae.save_pretrained(tmp_path / "m"))
    for name in ("latent_shift", "latent_scale"):
        assert torch.equal(getattr(vae, name), getattr(again, name))
    a, b = vae.encode(x), again.encode(x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert torch.equal(vae.decode(a.mean), again.decode(b.mean))


def test_latent_statistics_normalise_the_latents() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(in_channels=1, channel_mult=(1, 2), **TINY)).eval()
    data = [VAE.from_uint8(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)) for _ in range(4)]
    vae.fit_latent_stats(data)
    torch.manual_seed(1)
    z = torch.cat([vae.encode(x).sample() for x in data])
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.15 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.15
    # decode undoes the normalisation: decoding normalised latents equals decoding the raw ones.
    raw = vae.posterior_raw(data[0]).mean
    assert torch.allclose(vae.decode(vae.encode(data[0]).mean), vae.reconstruction(vae.decoder_output(raw)),
                          atol=1e-5)


def test_uint8_helpers_round_trip() -> None:
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = VAE.from_uint8(u)
    assert x.min() > -1 and x.max() < 1 and torch.equal(VAE.to_uint8(x), u)


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    vae = VAE(VAEConfig(in_channels=1, channel_mult=(1, 2, 2), **TINY))
    with pytest.raises(TypeError, match="VAE.from_uint8"):
        vae.encode(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must be \[N, 1, H, W\]"):
        vae.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible by the VAE's factor 4"):
        vae.encode(torch.zeros(1, 1, 10, 8))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        vae.encode(torch.full((1, 1, 8, 8), 255.0))
    with pytest.raises(ValueError, match="latents must be float"):
        vae.decode(torch.zeros(1, 5, 2, 2))
    with pytest.raises(FileNotFoundError, match="is not a saved VAE"):
        VAE.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="downsampling factor 16"):
        VAE(VAEConfig(channel_mult=(1, 1, 1, 1, 1), **TINY))
    with pytest.raises(ConfigError, match="not divisible by the VAE's downsampling factor 8"):
        load_config("configs/vae_mnist.yaml", ["vae.channel_mult=[1,2,2,2]"], schema=VAERunConfig)
    with pytest.raises(ConfigError, match="vae.in_channels=3 but data.channels=1"):
        load_config("configs/vae_mnist.yaml", ["vae.in_channels=3"], schema=VAERunConfig)


def test_tiny_vae_training_on_mnist_improves_reconstructions(tmp_path: Path, mnist_shards: Path) -> None:
    cfg = load_config("configs/vae_mnist.yaml", [
        f"out_dir={tmp_path}", "name=v", f"data.shards={mnist_shards}", "data.num_workers=1", "vae.channels=8",
        "vae.groups=4", "vae.num_mixtures=2", "train.steps=60", "train.batch_size=16", "train.lr=3e-3",
        "train.warmup_steps=5", "train.eval_every=60", "train.eval_examples=100", "train.sample_every=60",
        "train.ckpt_every=60", "train.log_every=10", "loss.kl_warmup_steps=20"], schema=VAERunConfig)
    task = vae_task(cfg)
    before = task.evaluate(task.model)
    run_dir = train(cfg, task)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    after = next(r for r in rows if "test_psnr" in r)
    assert after["test_psnr"] > before["psnr"] + 3, (before, after)
    assert after["test_bpd"] < before["bpd"] - 1, (before, after)
    report = json.loads((run_dir / "test_report.json").read_text())
    assert report["num_images"] == 500 and report["bpd"] > 0 and report["kl_per_dim"] > 0
    assert (run_dir / "samples" / "step_00000060.png").is_file()
    vae = VAE.from_pretrained(run_dir / "vae")  # the exported model, with its latent statistics
    assert torch.equal(vae.latent_scale, torch.tensor(report["latent_scale"]))


def test_perceptual_decoder_with_gan_trains_through_the_loop(tmp_path: Path) -> None:
    """The LDM-style path: L1 + LPIPS (random backbone: no weights file here) + patch-GAN from step 3."""
    from latent_ndm.data.writer import make_shards

    make_shards("photo-patches", tmp_path / "photos", patch=32)
    cfg = load_config("configs/vae_photos.yaml", [
        f"out_dir={tmp_path}", "name=p", f"data.shards={tmp_path / 'photos'}",
        "data.num_workers=0", "vae.channels=8", "vae.groups=4", "vae.num_res_blocks=1", "loss.lpips_net=squeeze",
        "loss.lpips_random_backbone=true", "loss.gan_start_step=3", "loss.disc_channels=8", "loss.disc_layers=2",
        "train.steps=6", "train.batch_size=4", "train.log_every=1", "train.eval_every=6", "train.eval_examples=8",
        "train.sample_every=0", "train.ckpt_every=6"], schema=VAERunConfig)
    task = vae_task(cfg)
    disc_before = [p.detach().clone() for p in task.model.discriminator.parameters()]
    run_dir = train(cfg, task)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert all(steps[s]["adaptive_weight"] == 0 for s in (1, 2, 3)) and steps[6]["adaptive_weight"] > 0
    assert all(math.isfinite(r["loss"]) and r["lpips"] > 0 for r in steps.values())
    # The discriminator learns only from its hinge loss, which starts at step 3.
    after = load_file(latest_checkpoint(run_dir) / "model.safetensors")
    assert any(not torch.equal(b, after[f"discriminator.{n}"])
               for (n, _p), b in zip(task.model.discriminator.named_parameters(), disc_before))
    report = json.loads((run_dir / "test_report.json").read_text())
    assert "lpips" in report and "bpd" not in report and report["psnr"] > 0
    assert VAE.from_pretrained(run_dir / "vae").config.decoder == "perceptual"
