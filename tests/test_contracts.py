"""Contracts every implementation of a role must keep (after diffusers' ModelTesterMixin/PipelineTesterMixin):
one network contract over the U-Net and the DiT, one codec contract and one pipeline contract over pixel and
latent models. Each check is an exact equality or a comparison with an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import perturbed
from torch import nn
from torch.autograd import forward_ad as fwad

from latent_ndm.config import LatentRunConfig, NetConfig, load_config
from latent_ndm.core.codec import LatentCodec, PixelCodec, pixels_to_model
from latent_ndm.core.model import ImageModel
from latent_ndm.core.noise import Noise
from latent_ndm.evaluation.nelbo import nelbo_per_example
from latent_ndm.evaluation.pictures import TIMES, trajectory_rows, transform_rows
from latent_ndm.nets.build import build_loss, build_ndm, build_net
from latent_ndm.pipeline import NDMPipeline
from latent_ndm.tasks.diffusion import NELBOObjective
from latent_ndm.tasks.pixel import build_pixel_model
from vae.config import VAEConfig
from vae.model import VAE

TINY_VAE = VAEConfig(in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=2, groups=4, num_mixtures=2)
NETS = {"unet": NetConfig(arch="unet", size="tiny"), "dit": NetConfig(arch="dit", size="tiny")}


# -- networks: (x [B, C, H, W], t [B] or a 0-dim t) -> [B, C', H, W] -----------------------------------


def _net(arch: str, dtype: torch.dtype = torch.float32, c_in: int = 2, c_out: int = 3, **extra) -> nn.Module:
    torch.manual_seed(0)
    return build_net(NETS[arch], c_in, c_out, 8, dropout=0.0, **extra).to(dtype)


def _open(net: nn.Module) -> nn.Module:
    """Zero-initialised layers (output, adaLN-Zero) opened, so that outputs and d/dt are non-trivial."""
    return perturbed(net, 1, 0.1)


def _dt(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.func.jvp(lambda tt: net(x, tt), (t,), (torch.ones_like(t),))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", sorted(NETS))
def test_network_maps_shape_and_starts_at_zero(arch: str) -> None:
    net, x = _net(arch), torch.randn(5, 2, 8, 8)
    out = net(x, torch.rand(5))
    # The zero-initialised output layer: F(x, t) = x + t NN(x, t) starts as the identity, eps_hat as 0.
    assert out.shape == (5, 3, 8, 8) and out.dtype == x.dtype and not out.any()
    open_net = _net(arch, zero_init_out=False)
    t = torch.tensor(0.3)
    wide = open_net(x, t)  # a 0-dim t is broadcast over the batch
    assert wide.abs().max() > 0 and torch.equal(wide, open_net(x, t.expand(5)))


@pytest.mark.parametrize("arch", sorted(NETS))
def test_network_depends_on_x_and_t_and_every_parameter_learns(arch: str) -> None:
    net = _open(_net(arch))
    x, t = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.1, 0.4, 0.7, 0.9])
    out = net(x, t)
    assert not torch.equal(out, net(x, t.flip(0))) and not torch.equal(out, net(x.flip(0), t))
    torch.testing.assert_close(torch.cat([net(x[:1], t[:1]), net(x[1:], t[1:])]), out, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead


@pytest.mark.parametrize("arch", sorted(NETS))
def test_network_time_derivative_jvp_equals_central_differences_and_forward_ad(arch: str) -> None:
    """Networks used in F must support forward-mode AD in t (docs/MATH.md, section 6.1)."""
    net = _open(_net(arch, torch.float64, 2, 2))
    x, t = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        out, tangent = _dt(net, x, t)
        h = 1e-7  # d/dt is large (1000 t frequencies), so the truncation error needs a small step
        fd = (net(x, t + h) - net(x, t - h)) / (2 * h)
    assert tangent.norm() > 1e-3 * out.norm() > 0 and _rel(fd, tangent) < 1e-6
    torch.testing.assert_close(out, net(x, t), rtol=0, atol=1e-12)
    with torch.no_grad(), fwad.dual_level():
        primal, tangent_fwad = fwad.unpack_dual(net(x, fwad.make_dual(t, torch.ones_like(t))))
    torch.testing.assert_close(primal, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent_fwad, tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", sorted(NETS))
def test_network_under_bf16_autocast_is_close_to_float32_with_its_time_derivative(arch: str) -> None:
    net = _open(_net(arch, c_in=4, c_out=4))
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
    out32, tan32 = _dt(net, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = net(x, t)
        jvp_out16, tan16 = _dt(net, x, t)  # a plain nn.GroupNorm fails here (bf16 primal, fp32 tangent)
    assert out16.dtype == torch.bfloat16 and tan16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all() and torch.isfinite(tan16).all()
    assert out32.abs().mean() > 0.1 and tan32.abs().mean() > 0.1  # non-trivial, so the errors mean something
    assert _rel(out16.float(), out32) < 0.05 and _rel(jvp_out16.float(), out32) < 0.05
    assert _rel(tan16.float(), tan32) < 0.1


# -- codecs: encode(batch, noise) -> (x, {term: [B]}), decode(x) -> uint8 ------------------------------


def _codec(kind: str) -> PixelCodec | LatentCodec:
    torch.manual_seed(0)
    return PixelCodec() if kind == "pixel" else LatentCodec(perturbed(VAE(TINY_VAE), 1, 0.02).eval())


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_codec_contract(kind: str) -> None:
    codec, images, ids = _codec(kind), _images(4), [3, 1, 4, 1]
    shape = codec.model_shape((1, 8, 8))
    x, terms = codec.encode(images, Noise.per_example(ids, "cpu", 0, "codec"))
    assert x.shape == (4, *shape) and x.is_floating_point()
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in terms.values())
    assert set(terms) == (set() if kind == "pixel" else {"decoder", "log_q"})
    # Keyed noise: an example's encoding depends on its key, not on its batch (ids 1 twice: equal rows).
    again, _ = codec.encode(images[[1, 3]], Noise.per_example([1, 1], "cpu", 0, "codec"))
    torch.testing.assert_close(again, x[[1, 3]], rtol=1e-5, atol=1e-6)
    decoded = codec.decode(codec.encode_mean(images))
    assert decoded.dtype == torch.uint8 and decoded.shape == images.shape
    if kind == "pixel":  # lossless: the bin centres and back
        assert torch.equal(decoded, images) and torch.equal(x, pixels_to_model(images))
    else:  # z0 = mean + std * eps with eps the key's first draw; log q is the Gaussian's density there
        q = codec.vae.encode(codec.vae.from_uint8(images))
        eps = (x - q.mean) / q.std
        expect = -0.5 * (eps.square() + q.logvar + math.log(2 * math.pi)).flatten(1).sum(1)
        torch.testing.assert_close(terms["log_q"], expect, rtol=1e-5, atol=1e-4)
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(images.float())


# -- pipelines: pixel and latent alike ------------------------------------------------------------------


def _pipeline(kind: str, tmp_path: Path) -> NDMPipeline:
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]",
                                                                             "groups=4")]
    torch.manual_seed(0)
    if kind == "pixel":
        cfg = load_config("configs/ndm_mnist.yaml", [*nets, "data.image_size=8"])
        model = build_pixel_model(cfg)
    else:
        vae_dir = VAE(TINY_VAE).save_pretrained(tmp_path / "vae")
        cfg = load_config("configs/latent_ndm_mnist.yaml", [*nets, "data.image_size=8", f"vae_path={vae_dir}"],
                          schema=LatentRunConfig)
        model = ImageModel(LatentCodec(VAE.from_pretrained(vae_dir), frozen=True), build_ndm(cfg.model, 2, 4))
    perturbed(model.ndm, 5, 0.02)
    return NDMPipeline(model, (1, 8, 8), cfg)


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_pipeline_contract(kind: str, tmp_path: Path) -> None:
    pipe = _pipeline(kind, tmp_path)
    images = _images(5, seed=1)
    # Save/load round trip: the same weights, the same samples from the same generator.
    again = NDMPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "saved"))
    assert again.is_latent == (kind == "latent") and again.image_shape == (1, 8, 8)
    a, b = pipe.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s1 = pipe.sample(3, "ancestral", 4, torch.Generator().manual_seed(7))
    s2 = again.sample(3, "ancestral", 4, torch.Generator().manual_seed(7))
    assert s1.dtype == torch.uint8 and s1.shape == (3, 1, 8, 8) and torch.equal(s1, s2)
    assert not torch.equal(s1, pipe.sample(3, "ancestral", 4, torch.Generator().manual_seed(8)))
    # Per-example keying: the NELBO and ODE bound of an image do not depend on the batch it is in.
    ids = torch.tensor([9, 2, 5, 7, 0])
    one = pipe.nelbo_bpd(images, ids=ids, batch_size=5)
    two = pipe.nelbo_bpd(images, ids=ids, batch_size=2)
    assert one["bpd"] == pytest.approx(two["bpd"], rel=1e-6) and one["num_images"] == 5
    assert set(one) >= {"rec_bpd", "diff_bpd", "prior_bpd", "bpd", "bpd_stderr"}
    assert ("decoder_bpd" in one) == (kind == "latent")
    per_image = pipe.nelbo_bpd(images, ids=ids, batch_size=1)
    assert per_image["bpd"] == pytest.approx(one["bpd"], rel=1e-6)
    # An image evaluated alone gets exactly its terms in the batch of five (its id keys its draws).
    alone = nelbo_per_example(pipe.model, images[[3]], ids[[3]])
    together = nelbo_per_example(pipe.model, images, ids)
    for k in together:
        assert alone[k][0].item() == pytest.approx(together[k][3].item(), rel=1e-6, abs=1e-6), k
    assert not torch.allclose(together["diff"][3], together["diff"][2])  # the images' draws differ
    ode = pipe.ode_nll_bpd(images[:2], ids=ids[:2], rtol=1e-2, atol=1e-2)  # loose: only the contract is tested here
    assert math.isfinite(ode["bpd"]) and ode["nfe_mean"] > 0 and "ode_nll_bpd" in ode
    # encode/decode speak model space.
    z = pipe.encode(images)
    assert z.shape == (5, *pipe.model_shape) and pipe.decode(z).shape == images.shape
    # Pictures, through the codec: column 0 is F(x, 0) = x, i.e. the decoded encoding of each image.
    rows, diff, scale = transform_rows(pipe.model, images[:2])
    assert rows.shape == (2 * len(TIMES), 1, 8, 8) and diff.shape == rows.shape and scale > 0
    assert torch.equal(rows.view(2, len(TIMES), 1, 8, 8)[:, 0], pipe.decode(z[:2]))
    traj = trajectory_rows(pipe.model, 2, 7, 4, generator=torch.Generator().manual_seed(0))
    assert traj.shape == (8, 1, 8, 8) and traj.dtype == torch.uint8


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_weights_saved_by_earlier_versions_still_load(kind: str, tmp_path: Path) -> None:
    """Before the codec/loss split a pixel model's weights were a bare NDM's (with the t proposal's buffers
    under 'time_sampler.'), a latent model's 'vae.*' + 'ndm.*'; both load into today's ImageModel."""
    from safetensors.torch import save_file

    from latent_ndm.config import to_dict
    from latent_ndm.training.checkpoint import load_weights

    pipe = _pipeline(kind, tmp_path)
    state = {k: v.contiguous().clone() for k, v in pipe.ndm.state_dict().items()}
    state |= {"time_sampler.second_moment": torch.ones(100, dtype=torch.float64),
              "time_sampler.seen": torch.zeros(100, dtype=torch.float64)}
    if kind == "latent":
        state = {f"ndm.{k}": v for k, v in state.items()}
        state |= {f"vae.{k}": v.contiguous().clone() for k, v in pipe.codec.vae.state_dict().items()}
    save_file(state, str(tmp_path / "old.safetensors"))
    fresh = _pipeline(kind, tmp_path / "fresh").model
    perturbed(fresh.ndm, 9, 0.1)  # differs until loaded
    load_weights(fresh, tmp_path / "old.safetensors")
    a, b = pipe.model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Resuming (or init_from) such a run takes the proposal from those weights.
    objective = NELBOObjective(build_loss(pipe.config.model), 64)
    assert objective.load_legacy_proposal(state)
    stored = next(v for k, v in state.items() if k.endswith("time_sampler.second_moment"))
    assert torch.equal(objective.loss.proposal.second_moment, stored)
    if kind == "pixel":  # an earlier saved model: the run's config.json beside model.safetensors
        old = tmp_path / "old_saved"
        old.mkdir()
        save_file(state, str(old / "model.safetensors"))
        (old / "config.json").write_text(json.dumps(to_dict(pipe.config)))
        loaded = NDMPipeline.from_pretrained(old).model.state_dict()
        assert all(torch.equal(a[k], loaded[k]) for k in a)
