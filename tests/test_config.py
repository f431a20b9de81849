"""Every config file loads; bad keys, types and values give clear errors; paper-scale configs step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latent_ndm.codec import PixelCodec
from latent_ndm.config import ConfigError, LatentRunConfig, RunConfig, VAERunConfig, config_diff, load_config, to_dict
from latent_ndm.experiment import NELBOObjective, build_model

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path: Path) -> None:
    schema = {"vae": VAERunConfig, "latent": LatentRunConfig}.get(path.name.split("_")[0], RunConfig)
    cfg = load_config(path, schema=schema)
    assert isinstance(cfg, schema) and cfg.name == path.stem


def test_ndm_and_ddpm_configs_differ_only_in_the_transform() -> None:
    pairs = [("ndm_mnist", "ddpm_mnist"), ("ndm_mnist_t10", "ddpm_mnist_t10"), ("ndm_mnist_t1000", "ddpm_mnist_t1000"),
             ("ndm_cifar10", "ddpm_cifar10")]
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
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > (100e6 if name.startswith("ndm") else 50e6)
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    objective = NELBOObjective(PixelCodec(), 3 * 32 * 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nats, _ = objective(model, batch, torch.Generator().manual_seed(0))
    (nats.mean() * objective.loss_scale).backward()
    before = model.denoiser.net.out_conv.weight.detach().clone()
    opt.step()
    assert torch.isfinite(nats).all() and not torch.equal(before, model.denoiser.net.out_conv.weight)
