"""vae.perceptual: offline LPIPS loading, the patch discriminator and the LDM GAN loss terms."""

import urllib.request
from pathlib import Path

import lpips
import pytest
import torch
import torchvision
from torch import nn

from vae.perceptual import (
    LPIPS_WEIGHTS,
    PatchDiscriminator,
    adaptive_weight,
    disc_factor,
    generator_loss,
    hinge_d_loss,
    load_lpips,
    lpips_backbone_path,
    lpips_distance,
)


def _forbid_downloads(mp: pytest.MonkeyPatch) -> list[str]:
    """Make the network primitives behind torch.hub (which torchvision uses) raise; returns the attempts."""
    attempts: list[str] = []

    def refuse(url, *args, **kwargs):
        attempts.append(str(getattr(url, "full_url", url)))
        raise AssertionError(f"network access attempted: {url}")

    # not load_state_dict_from_url: it is also what reads a cached file
    mp.setattr(torch.hub, "download_url_to_file", refuse)
    mp.setattr(urllib.request, "urlopen", refuse)
    return attempts


def _empty_hub(mp: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the torch hub cache at an empty folder (restored by the monkeypatch); returns its checkpoints/."""
    mp.setenv("TORCH_HOME", str(tmp_path))
    mp.setattr(torch.hub, "_hub_dir", None)  # an earlier torch.hub.set_dir would mask $TORCH_HOME
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def lpips_model() -> nn.Module:
    with pytest.MonkeyPatch.context() as mp:
        attempts = _forbid_downloads(mp)
        model = load_lpips("vgg", random_backbone=True)
    assert attempts == []
    return model


def _images(b: int = 2, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    # small: the VGG trunk is the slow part of this file (16x16 still reaches its 1x1 deepest layer)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


def test_lpips_random_backbone_is_a_distance(lpips_model: nn.Module) -> None:
    x, y = _images(seed=0), _images(seed=1)
    d_xx = lpips_distance(lpips_model, x, x)
    d_xy = lpips_distance(lpips_model, x, y)
    assert d_xx.shape == d_xy.shape == (2,)
    assert torch.equal(d_xx, torch.zeros(2))
    assert (d_xy > 1e-4).all()
    torch.testing.assert_close(lpips_distance(lpips_model, y, x), d_xy)
    # per example: a batch element's distance does not depend on the others
    torch.testing.assert_close(lpips_distance(lpips_model, x[:1], y[:1]), d_xy[:1])


def test_lpips_grey_images_are_repeated_to_rgb(lpips_model: nn.Module) -> None:
    x, y = _images(b=2, c=1, size=28, seed=2), _images(b=2, c=1, size=28, seed=3)
    d = lpips_distance(lpips_model, x, y)
    assert d.shape == (2,) and (d > 1e-4).all()
    torch.testing.assert_close(d, lpips_distance(lpips_model, x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="expected"):
        lpips_distance(lpips_model, _images(c=2), _images(c=2))


def test_lpips_is_frozen_and_deterministic(lpips_model: nn.Module) -> None:
    # the calibrated heads from the lpips wheel are loaded (lpips loads them with strict=False)
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu")
    torch.testing.assert_close(lpips_model.lin0.model[1].weight, heads["lin0.model.1.weight"], rtol=0, atol=0)
    assert not lpips_model.training
    assert all(not p.requires_grad for p in lpips_model.parameters())
    x, y = _images(seed=4), _images(seed=5)
    d_eval = lpips_distance(lpips_model, x, y)
    try:
        lpips_model.train()  # as a parent module's .train() would do: the head dropout must stay inert
        torch.testing.assert_close(lpips_distance(lpips_model, x, y), d_eval, rtol=0, atol=0)
    finally:
        lpips_model.eval()


def test_lpips_gradient_reaches_the_input(lpips_model: nn.Module) -> None:
    x, y = _images(seed=6).requires_grad_(), _images(seed=7)
    lpips_distance(lpips_model, x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("net", sorted(LPIPS_WEIGHTS))
def test_lpips_missing_backbone_raises_without_download(
    net: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _empty_hub(monkeypatch, tmp_path)
    attempts = _forbid_downloads(monkeypatch)
    assert lpips_backbone_path(net) == folder / LPIPS_WEIGHTS[net]
    with pytest.raises(FileNotFoundError) as info:
        load_lpips(net)
    message = str(info.value)
    assert LPIPS_WEIGHTS[net] in message
    assert str(folder) in message
    assert f"https://download.pytorch.org/models/{LPIPS_WEIGHTS[net]}" in message
    assert attempts == []
    assert not folder.exists()  # torch.hub was not even reached (it creates the folder before downloading)


def test_lpips_uses_a_cached_backbone_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our path is the one torchvision reads: a (random) squeezenet placed there is loaded, nothing downloaded."""
    folder = _empty_hub(monkeypatch, tmp_path)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    backbone = torchvision.models.squeezenet1_1(weights=None)
    torch.save(backbone.state_dict(), folder / LPIPS_WEIGHTS["squeeze"])
    attempts = _forbid_downloads(monkeypatch)
    model = load_lpips("squeeze")
    assert attempts == []
    torch.testing.assert_close(model.net.slice1[0].weight, backbone.features[0].weight, rtol=0, atol=0)


def test_lpips_unknown_net() -> None:
    with pytest.raises(ValueError, match="alex.*squeeze.*vgg"):
        load_lpips("resnet", random_backbone=True)


@pytest.mark.parametrize(
    "size, channels, n_layers, hw",
    [
        (32, 1, 3, 2),
        (32, 3, 3, 2),
        (28, 1, 2, 5),
        (28, 3, 2, 5),
        (28, 1, 3, 1),  # documented: 28x28 with the default depth leaves a single (global) logit
    ],
)
def test_patch_discriminator_shape(size: int, channels: int, n_layers: int, hw: int) -> None:
    disc = PatchDiscriminator(channels, channels=16, n_layers=n_layers)
    out = disc(torch.randn(2, channels, size, size))
    assert out.shape == (2, 1, hw, hw)


def test_patch_discriminator_structure_and_init() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(3)
    out = disc(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 1, 2, 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert abs(convs[3].weight.std().item() - 0.02) < 1e-3  # 2M weights: N(0, 0.02)
    assert abs(convs[3].weight.mean().item()) < 1e-3
    # GroupNorm: an image's logits do not depend on the rest of the batch, in train mode too
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(disc.train()(x)[:1], disc(x[:1]))


def test_hinge_and_generator_losses_by_hand() -> None:
    real = torch.tensor([[[[2.0, 0.5], [-1.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # [2, 1, 2, 2]
    fake = torch.tensor([[[[-2.0, 0.0], [1.0, -0.5]]], [[[3.0, -3.0], [0.0, 1.0]]]])
    # example 0: relu(1 - real) = [0, .5, 2, 0] -> .625; relu(1 + fake) = [0, 1, 2, .5] -> .875
    # example 1: relu(1 - real) = 1;                   relu(1 + fake) = [4, 0, 1, 2] -> 1.75
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor([0.5 * (0.625 + 0.875), 0.5 * (1 + 1.75)]))
    torch.testing.assert_close(generator_loss(fake), torch.tensor([0.375, -0.25]))


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 5, 4, 3
    decoder = nn.Linear(d_in, d_out)  # last (only) layer: W [3, 4]
    z, target = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    v = torch.randn(d_out, generator=g)  # a fixed linear "discriminator"
    out = decoder(z)
    rec_loss = ((out - target) ** 2).mean()
    g_loss = -(out @ v).mean()

    # closed forms: d rec / dW = 2 / (n d_out) * (out - target)^T z ; d g / dW = -v zbar^T
    with torch.no_grad():
        rec_grad = 2.0 / (n * d_out) * (out - target).T @ z
        g_grad = -torch.outer(v, z.mean(0))
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)

    weight = adaptive_weight(rec_loss, g_loss, decoder.weight)
    torch.testing.assert_close(weight, expected)
    assert weight.ndim == 0 and not weight.requires_grad
    assert adaptive_weight(rec_loss, g_loss, decoder.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    (rec_loss + weight * g_loss).backward()  # the graph was retained for the caller
    assert decoder.weight.grad is not None
    with pytest.raises(ValueError, match="scalar"):
        adaptive_weight(((out - target) ** 2).mean(1), g_loss, decoder.weight)


def test_disc_factor() -> None:
    assert [disc_factor(s, start=3) for s in (0, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    assert disc_factor(0, start=0) == 1.0
