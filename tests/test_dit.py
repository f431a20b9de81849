"""Tests for latent_ndm.nets.dit and the arch switch: shapes, zero init, forward-mode AD in t, bf16, the NDM with
DiT networks built from a config, validation and presets."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed
from timm.layers import Attention

from latent_ndm.config import ConfigError, ModelConfig, NetConfig, load_config
from latent_ndm.core.loss import NDMLoss
from latent_ndm.nets.build import build_ndm, build_net
from latent_ndm.nets.dit import DIT_SIZES, DiT, build_dit
from latent_ndm.nets.unet import UNet

# torch loads its jvp decompositions through the deprecated torch.jit.script on first forward-AD use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _perturbed_tiny(dtype: torch.dtype, size: int = 8, ch: int = 4, seed: int = 0) -> DiT:
    """A tiny DiT whose zero-initialised layers (adaLN-Zero, output) are opened so that d/dt is non-trivial."""
    torch.manual_seed(seed)
    return perturbed(build_dit("tiny", ch, ch, size), seed, scale=0.1).to(dtype)


def _dt(model: DiT, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and d/dt of model(x, t) via torch.func.jvp."""
    return torch.func.jvp(lambda tt: model(x, tt), (t,), (torch.ones_like(t),))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_shapes_and_zero_init() -> None:
    model = build_dit("tiny", 4, 4, 8)
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2))
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # F(x,t) = x + t*NN starts as the identity

    out = build_dit("tiny", 3, 3, 12, patch_size=3)(torch.randn(3, 3, 12, 12), torch.tensor(0.5))  # 0-dim t
    assert out.shape == (3, 3, 12, 12) and torch.equal(out, torch.zeros_like(out))

    other = build_dit("tiny", 3, 5, 8, zero_init_out=False)(torch.randn(2, 3, 8, 8), torch.rand(2))
    assert other.shape == (2, 5, 8, 8) and other.abs().max() > 0


def test_unpatchify_keeps_patches_in_place() -> None:
    """At init every block is the identity (adaLN-Zero), so with a non-zero output layer the output is a
    per-token map: a change inside one patch changes the output inside that patch only."""
    model = build_dit("tiny", 2, 2, 8, zero_init_out=False, depth=1).double()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[0, :, 2:4, 4:6] += 1.0  # patch (row 1, column 2) with patch_size 2
    t = torch.rand(1, dtype=torch.float64)
    with torch.no_grad():
        changed = (model(y, t) - model(x, t)).abs().sum(1)[0] > 1e-12
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)


def test_attention_is_never_fused_and_must_not_be() -> None:
    model = _perturbed_tiny(torch.float32)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == DIT_SIZES["tiny"]["depth"] and all(not a.fused_attn for a in attns)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    _dt(model, x, t)  # works
    for a in attns:
        a.fused_attn = True
    # The reason for the switch: SDPA's fused kernels have no forward-AD rule (torch 2.14). Should this start
    # to pass, fused attention could be allowed outside F.
    with pytest.raises(NotImplementedError, match="forward AD"):
        _dt(model, x, t)


def test_ndm_with_dit_networks_trains_every_parameter() -> None:
    dit = NetConfig(arch="dit", size="tiny")
    cfg = ModelConfig(likelihood="gaussian", num_steps=0, denoiser=dit, transform_net=dit)
    torch.manual_seed(0)
    model = build_ndm(cfg, channels=4, image_size=8)
    assert isinstance(model.denoiser.net, DiT) and isinstance(model.transform.net, DiT)
    x = torch.randn(6, 4, 8, 8)
    with torch.no_grad():  # F starts as the identity: F(x, t) = x and dF/dt = 0
        f, fdot = model.transform.value_and_time_derivative(x, torch.rand(6))
    assert torch.equal(f, x) and not fdot.any()

    perturbed(model.denoiser.net, seed=1)
    perturbed(model.transform.net, seed=2)
    terms = NDMLoss()(model, x, torch.Generator().manual_seed(0))
    loss = sum(v.mean() for v in terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    for prefix, net in (("denoiser", model.denoiser.net), ("transform", model.transform.net)):
        dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
        assert not dead, f"{prefix} parameters without gradient: {dead}"


def test_build_net_dispatches_on_arch() -> None:
    assert isinstance(build_net(NetConfig(size="tiny"), 2, 2, 8), UNet)
    dit = build_net(NetConfig(arch="dit", size="tiny", hidden=16, dropout=0.1), 2, 2, 8, depth=1)
    assert isinstance(dit, DiT) and len(dit.blocks) == 1 and dit.blocks[0].mlp.drop1.p == 0.1
    # overrides() gives only the fields of the chosen arch, so a U-Net never sees DiT keys and vice versa.
    both = dict(channels=32, dropout=0.1, hidden=64)
    assert NetConfig(**both).overrides() == {"channels": 32, "dropout": 0.1}
    assert NetConfig(arch="dit", **both).overrides() == {"hidden": 64, "dropout": 0.1}
    with pytest.raises(ValueError, match="unknown network arch 'vit'"):
        build_net(NetConfig(arch="vit"), 2, 2, 8)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.denoiser.patch_size=3"], r"model\.denoiser\.patch_size = 3 must divide data\.image_size = 28"),
        (["data.image_size=9"], r"model\.denoiser\.patch_size = 2 must divide data\.image_size = 9"),  # preset's
        (["model.denoiser.channels=32"], r"model\.denoiser\.channels does not apply to arch=dit"),
        (["model.denoiser.size=small"], r"model\.denoiser\.size = 'small' is not a DiT preset"),
        (["model.denoiser.arch=vit"], r"model\.denoiser\.arch = 'vit'; choose one of unet, dit"),
    ],
)
def test_config_validation(overrides: list[str], match: str) -> None:
    base = ["model.denoiser.arch=dit", "model.transform_net.arch=dit", "model.denoiser.size=mnist",
            "model.transform_net.size=mnist"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, base + overrides)
    cfg = load_config(None, base + ["model.denoiser.patch_size=4"])  # 4 divides MNIST's 28
    assert cfg.model.denoiser.overrides() == {"patch_size": 4}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=10, patch_size=4), "patch_size 4 must divide image_size 10"),
        (dict(hidden=30, heads=3), "multiple of 4"),
        (dict(hidden=32, heads=3), "heads 3 must divide hidden 32"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiT(1, 1, **{"image_size": 8, "patch_size": 2, "hidden": 32, "depth": 1, "heads": 2, **kwargs})


def test_invalid_inputs_raise() -> None:
    model = build_dit("tiny", 3, 3, 8)
    t = torch.rand(2)
    with pytest.raises(ValueError, match="expects x of shape"):
        model(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(ValueError, match="built for 8x8"):
        model(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 3, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="unknown DiT size"):
        build_dit("XXL", 3, 3, 8)


@pytest.mark.parametrize(
    ("size", "lo", "hi"),
    [("tiny", 4e4, 6e4), ("mnist", 6e5, 8e5), ("S", 3.2e7, 3.3e7), ("B", 1.29e8, 1.31e8)],  # paper: 33M, 130M
)
def test_presets_build(size: str, lo: float, hi: float) -> None:
    if size in ("S", "B"):  # count on the meta device: allocating and initialising 130M weights takes seconds
        with torch.device("meta"):
            model = build_dit(size, 4, 4, 32)
    else:
        model = build_dit(size, 4, 4, 32)
        assert model(torch.randn(1, 4, 32, 32), torch.rand(1)).shape == (1, 4, 32, 32)
    n = sum(p.numel() for p in model.parameters())
    print(f"{size}: {n:,} parameters at 32x32x4")
    assert lo < n < hi


def test_every_preset_is_tested() -> None:
    assert set(DIT_SIZES) == {"tiny", "mnist", "S", "B"}
