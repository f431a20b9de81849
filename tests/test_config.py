"""Every config file loads; bad keys, types and values give clear errors; paper-scale configs step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latent_ndm.config import ConfigError, LatentRunConfig, RunConfig, VAERunConfig, config_diff, load_config, to_dict
from latent_ndm.nets.build import build_loss
from latent_ndm.tasks.diffusion import NELBOObjective
from latent_ndm.tasks.pixel import build_pixel_model

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path: Path) -> None:
    schema = {"vae": VAERunConfig, "latent": LatentRunConfig}.get(path.name.split("_")[0], RunConfig)
    cfg = load_config(path, schema=schema)
    assert isinstance(cfg, schema) and cfg.name == path.stem


def test_ndm_and_ddpm_configs_differ_only_in_the_transform() -> None:
    pairs = [("ndm_mnist", "ddpm_mnist"), ("ndm_mnist_t10", "ddpm_mnist_t10"), ("ndm_mnist_t1000", "ddpm_mnist_t1000"),
             ("ndm_cifar10", "ddpm_cifar10"), ("ndm_imagenet32", "ddpm_imagenet32"),
             ("ndm_imagenet64", "ddpm_imagenet64")]
    for ndm, ddpm in pairs:
        a, b = (to_dict(load_config(f"configs/{n}.yaml", ["name=x"])) for n in (ndm, ddpm))
        a["model"]["transform_net"] = b["model"]["transform_net"]  # unused when F = identity
        assert config_diff(a, b) == ["model.transform: 'neural' -> 'identity'"]


def test_overrides_are_typed_and_checked() -> None:
    overrides = ["train.lr=1e-3", "model.num_steps=10", "model.denoiser.channel_mult=[1,2]"]
    cfg = load_config("configs/ndm_mnist.yaml", overrides)
    assert cfg.train.lr == 1e-3 and cfg.model.num_steps == 10 and cfg.model.denoiser.channel_mult == (1, 2)
    with pytest.raises(ConfigError, match=r"unknown config key train\.lrate; valid keys here: .*train\.lr"):
        load_config("configs/ndm_mnist.yaml", ["train.lrate=1e-3"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 'many'"):
        load_config("configs/ndm_mnist.yaml", ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model\.transform = 'magic'; choose one of neural, identity"):
        load_config("configs/ndm_mnist.yaml", ["model.transform=magic"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("configs/ndm_mnist.yaml", ["train.steps"])


def test_bad_yaml_key_names_the_section(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  schedule:\n    gamma_mn: -5\n")
    with pytest.raises(ConfigError, match=r"model\.schedule\.gamma_mn.*model\.schedule\.gamma_min"):
        load_config(bad)


@pytest.mark.parametrize("name", ["ndm_cifar10", "ddpm_cifar10"])
def test_paper_scale_configs_build_and_take_one_step(name: str) -> None:
    cfg = load_config(f"configs/{name}.yaml")
    torch.manual_seed(0)
    model = build_pixel_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > (100e6 if name.startswith("ndm") else 50e6)
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    objective = NELBOObjective(build_loss(cfg.model), 3 * 32 * 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nats, _ = objective(model, batch, torch.Generator().manual_seed(0))
    (nats.mean() * objective.loss_scale).backward()
    before = model.ndm.denoiser.net.out_conv.weight.detach().clone()
    opt.step()
    assert torch.isfinite(nats).all() and not torch.equal(before, model.ndm.denoiser.net.out_conv.weight)


@pytest.mark.parametrize("vae_name,latent_name,params", [
    ("vae_cifar10", "latent_ndm_cifar10", 100e6),  # two DDPM++ U-Nets on 16x16 latents
    ("vae_celebahq256", "latent_ndm_celebahq256", 160e6),  # DiT-B/2 denoiser + DiT-S/2 in F on 32x32 latents
])
def test_paper_scale_latent_configs_build_and_step(vae_name: str, latent_name: str, params: float,
                                                   tmp_path: Path) -> None:
    from latent_ndm.core.noise import Noise
    from latent_ndm.tasks.latent import build_latent_model
    from vae.config import VAEConfig
    from vae.model import VAE

    torch.manual_seed(0)
    vae_cfg = load_config(f"configs/{vae_name}.yaml", schema=VAERunConfig)
    vae_dir = VAE(VAEConfig.from_dict(to_dict(vae_cfg.vae))).save_pretrained(tmp_path / "vae")
    cfg = load_config(f"configs/{latent_name}.yaml", [f"vae_path={vae_dir}", "stage=joint"], schema=LatentRunConfig)
    model = build_latent_model(cfg)
    assert sum(p.numel() for p in model.ndm.parameters()) > params
    size = cfg.data.image_size
    noise = Noise.per_example([0], "cpu", 0)
    parts = [model.ndm.denoiser, model.ndm.transform]
    if size <= 32:  # a whole stage-3 step: VAE and prior
        images = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
        objective = NELBOObjective(build_loss(cfg.model), 3 * size * size, cfg.kl_anneal_steps, cfg.kl_anneal_start)
        nats, _ = objective(model, images, noise)
        parts += [model.codec.vae.encoder, model.codec.vae.decoder]
    else:  # 256x256: a 2.6 TFLOP VAE step is too slow for CPU tests; the prior steps on a pre-encoded posterior
        c, h, w = model.codec.vae.latent_shape(size)
        objective = NELBOObjective(build_loss(cfg.model), 3 * size * size)
        nats, _ = objective(model, torch.randn(1, 2 * c, h, w), noise)
    (nats.mean() * objective.loss_scale).backward()
    assert torch.isfinite(nats).all()
    for part in parts:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_configs_build_vdm_networks(size: int) -> None:
    """VDM's ImageNet U-Net: `size` residual blocks down, size + 1 up and 2 in the middle, all at full
    resolution; NDM has one in the denoiser and one in F. Built on the meta device: no memory."""
    from latent_ndm.nets.build import build_ndm
    from latent_ndm.nets.unet import ResBlock

    for kind, nets in (("ndm", 2), ("ddpm", 1)):
        cfg = load_config(f"configs/{kind}_imagenet{size}.yaml")
        assert (cfg.data.channels, cfg.data.image_size, cfg.train.batch_size) == (3, size, 128)
        with torch.device("meta"):
            ndm = build_ndm(cfg.model, 3, size)
        blocks = [m for m in ndm.modules() if isinstance(m, ResBlock)]
        assert len(blocks) == nets * (2 * size + 3) and {b.conv1.out_channels for b in blocks} == {256}
