"""Tests for latent_ndm.nets.unet: shapes, forward-mode AD in t, reverse-over-forward, bf16, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latent_ndm.nets.unet import UNET_SIZES, GroupNorm32, UNet, build_unet

# torch loads its jvp decompositions through the deprecated torch.jit.script on first forward-AD use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _perturbed_tiny(dtype: torch.dtype, size: int = 8, ch: int = 2, seed: int = 0) -> UNet:
    """A tiny U-Net whose zero-initialised layers are perturbed so that output and d/dt are non-trivial."""
    torch.manual_seed(seed)
    model = build_unet("tiny", ch, ch, size).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _dt(model: UNet, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and d/dt of model(x, t) via torch.func.jvp."""
    return torch.func.jvp(lambda tt: model(x, tt), (t,), (torch.ones_like(t),))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_shapes_and_zero_init() -> None:
    mnist = build_unet("tiny", 1, 1, 28, channel_mult=(1, 2, 2))  # 28 -> 14 -> 7
    out = mnist(torch.randn(2, 1, 28, 28), torch.rand(2))
    assert out.shape == (2, 1, 28, 28)
    assert torch.equal(out, torch.zeros_like(out))

    rgb = build_unet("tiny", 3, 3, 16)
    out = rgb(torch.randn(3, 3, 16, 16), torch.tensor(0.5))  # 0-dim t is broadcast
    assert out.shape == (3, 3, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))

    other = build_unet("tiny", 3, 5, 16, zero_init_out=False)(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert other.shape == (2, 5, 16, 16) and other.abs().max() > 0


def test_reverse_over_forward_gradient() -> None:
    model = _perturbed_tiny(torch.float64)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)

    def loss() -> torch.Tensor:
        return _dt(model, x, t)[1].pow(2).sum()

    loss().backward()
    named = dict(model.named_parameters())
    zero_grad = {n for n, p in named.items() if p.grad is None or not p.grad.any()}
    # The output bias is the only parameter that does not influence d/dt.
    assert zero_grad == {"out_conv.bias"}, f"parameters without gradient through the tangent: {zero_grad}"

    # One scalar in the time MLP and one in the middle attention, checked by central differences.
    h = 1e-6
    for name, idx in [("time_mlp.0.weight", (3, 5)), ("mid.0.attn.qkv.weight", (7, 2, 0, 0))]:
        p = named[name]
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + h
            plus = loss()
            p[idx] = orig - h
            minus = loss()
            p[idx] = orig
        fd = ((plus - minus) / (2 * h)).item()
        assert fd != 0.0
        print(f"{name}{list(idx)}: autograd {p.grad[idx].item():.10g}, central difference {fd:.10g}")
        assert abs(p.grad[idx].item() - fd) < 1e-6 * abs(fd), (name, p.grad[idx].item(), fd)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=30, channel_mult=(1, 2, 2)), "divisible by 2"),
        (dict(image_size=16, channels=20, groups=8), "not divisible by groups"),
        (dict(image_size=16, attn_resolutions=(4,)), "do not occur"),
        (dict(image_size=16, num_heads=3), "num_heads"),
    ],
)
def test_invalid_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(1, 1, **{"channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "groups": 8, **kwargs})


def test_invalid_inputs_raise() -> None:
    model = build_unet("tiny", 3, 3, 8)
    t = torch.rand(2)
    with pytest.raises(ValueError, match="expects x of shape"):
        model(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(ValueError, match="built for 8x8"):
        model(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 3, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="unknown U-Net size"):
        build_unet("huge", 3, 3, 8)


@pytest.mark.parametrize(
    ("size", "ch", "res", "lo", "hi"),
    [
        ("tiny", 3, 16, 1e5, 5e5),
        ("mnist", 1, 28, 1e5, 6e5),
        ("small", 1, 28, 5e5, 3e6),
        ("base", 3, 32, 3e6, 1.5e7),
        ("ddpmpp_cifar10", 3, 32, 4e7, 8e7),  # DDPM++ cont. reports ~62M
        ("vdm_imagenet32", 3, 32, 1.3e8, 1.5e8),  # 32 + 33 blocks of 256 channels at full resolution
        ("vdm_imagenet64", 3, 64, 2.6e8, 2.8e8),  # 64 + 65 blocks
    ],
)
def test_presets_build(size: str, ch: int, res: int, lo: float, hi: float) -> None:
    big = size.startswith("vdm")
    with torch.device("meta" if big else "cpu"):  # shapes only: no memory for the 140M and 270M models
        model = build_unet(size, ch, ch, res)
    n = sum(p.numel() for p in model.parameters())
    print(f"{size}: {n:,} parameters")
    assert lo < n < hi
    if size != "ddpmpp_cifar10" and not big:  # a forward of the 63M model would dominate the test time
        out = model(torch.randn(1, ch, res, res), torch.rand(1))
        assert out.shape == (1, ch, res, res)


def test_every_preset_is_tested() -> None:
    assert set(UNET_SIZES) == {"tiny", "mnist", "small", "base", "ddpmpp_cifar10", "vdm_imagenet32", "vdm_imagenet64"}


def test_groupnorm32_bf16_fast_path_equals_the_float32_round_trip() -> None:
    """On CPU a bf16 input goes straight to the mixed-precision kernel (float32 statistics); output and
    gradients equal GroupNorm in float32 cast back to bf16, to bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(4, 16)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    x = (3 + 2 * torch.randn(2, 16, 8, 8, generator=g)).bfloat16().requires_grad_()  # mean far from 0
    dy = torch.randn(2, 16, 8, 8, generator=g).bfloat16()
    fast = norm(x)
    ref = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
    assert fast.dtype == torch.bfloat16
    assert type(fast.grad_fn).__name__ == "NativeGroupNormBackward0"  # the kernel, not the round trip
    torch.testing.assert_close(fast.float(), ref.bfloat16().float(), rtol=2**-7, atol=2**-7)
    got = torch.autograd.grad(fast, [x, norm.weight, norm.bias], dy)
    want = torch.autograd.grad(ref, [x, norm.weight, norm.bias], dy.float())
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2**-6, atol=2**-6 * want[0].abs().max().item())
    for a, b in zip(got[1:], want[1:]):  # float32 parameter gradients, accumulated in float32
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * b.abs().max().item())


def test_unet_under_bf16_autocast_traces_into_one_graph_equal_to_eager() -> None:
    """torch.compile of the denoiser under bf16 autocast: GroupNorm32's forward-mode query on its bf16 fast
    path is a graph break dynamo cannot trace (it once made `benchmark speed --bf16 --compile` fail in
    inductor), so under compilation it is skipped. fullgraph=True raises at any graph break; the eager
    backend keeps the test to dynamo's tracing, and the output must equal the uncompiled network's."""
    model = _perturbed_tiny(torch.float32, ch=3)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.autocast("cpu", torch.bfloat16):
        out, ref = compiled(x, t), model(x, t)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)
