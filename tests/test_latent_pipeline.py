"""The latent model's Python API and command line: load/save, sampling, encode/decode, and the full model's
bits/dim by its NELBO and with the prior's ODE NLL in place of the prior's NELBO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_latent import TINY_VAE

from latent_ndm.cli import main
from latent_ndm.config import LatentRunConfig, load_config, to_dict
from latent_ndm.core.codec import LatentCodec
from latent_ndm.core.model import ImageModel
from latent_ndm.core.noise import Noise
from latent_ndm.core.process import bits_per_dim
from latent_ndm.evaluation.nelbo import evaluate_nelbo, evaluate_ode_nll
from latent_ndm.nets.build import build_ndm
from latent_ndm.pipeline import NDMPipeline, load_pipeline
from latent_ndm.tasks.latent import latent_task
from latent_ndm.training.checkpoint import latest_checkpoint
from latent_ndm.training.loop import train
from vae.model import VAE

NETS = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "groups=4")]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return VAE(TINY_VAE).save_pretrained(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, vae_dir: Path, mnist_shards: Path) -> Path:
    """A stage-2 latent run of two steps: the tiny VAE (frozen) and a tiny NDM prior on its 2x14x14 latents
    (F = identity: the pipeline does not depend on F, and a forward-mode dF/dt would only slow the tests)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/latent_ndm_mnist.yaml", [
        f"out_dir={out}", "name=lp", f"vae_path={vae_dir}", f"data.shards={mnist_shards}", "data.num_workers=0",
        "train.steps=2", "train.batch_size=8", "train.eval_every=0", "train.sample_every=0", "train.ckpt_every=2",
        "eval.final_examples=8", "model.transform=identity", *NETS], schema=LatentRunConfig)
    train(cfg, latent_task(cfg))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return out / "lp"


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_run_directory_and_save_load_round_trip(run_dir: Path, tmp_path: Path) -> None:
    pipe = NDMPipeline.from_pretrained(run_dir)
    assert pipe.is_latent and isinstance(pipe.codec, LatentCodec) and pipe.model_shape == (2, 14, 14)
    ema = load_file(str(latest_checkpoint(run_dir) / "ema.safetensors"))
    state = pipe.model.state_dict()
    assert ema.keys() == state.keys() and all(torch.equal(ema[k], state[k]) for k in ema)

    saved = pipe.save_pretrained(tmp_path / "model")
    for name in ("config.json", "run.json", "ndm/config.json", "ndm/model.safetensors", "vae/config.json",
                 "vae/model.safetensors"):
        assert (saved / name).is_file(), name
    assert json.loads((saved / "config.json").read_text()) == {"class": "NDMPipeline", "codec": "latent",
                                                               "image_shape": [1, 28, 28]}
    again = NDMPipeline.from_pretrained(saved)
    assert again.is_latent and again.config == pipe.config
    assert all(isinstance(p, NDMPipeline) and p.is_latent for p in (load_pipeline(saved), load_pipeline(run_dir)))
    for (ka, a), (kb, b) in zip(state.items(), again.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka
    # The format saved before there was one pipeline class (the run config + vae/ + prior.safetensors) loads.
    old = tmp_path / "old"
    pipe.codec.vae.save_pretrained(old / "vae")
    save_file({k: v.contiguous() for k, v in pipe.ndm.state_dict().items()}, str(old / "prior.safetensors"))
    (old / "config.json").write_text(json.dumps(to_dict(pipe.config)))
    legacy = load_pipeline(old)
    assert legacy.is_latent
    for (ka, a), (kb, b) in zip(state.items(), legacy.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka

    x1 = pipe.sample(3, "ancestral", 3, torch.Generator().manual_seed(3))
    x2 = again.sample(3, "ancestral", 3, torch.Generator().manual_seed(3))
    assert x1.dtype == torch.uint8 and x1.shape == (3, 1, 28, 28) and torch.equal(x1, x2)
    assert pipe.last_nfe["nfe_xhat"] == 3
    images = _images(4)
    assert pipe.nelbo_bpd(images) == again.nelbo_bpd(images)

    with pytest.raises(TypeError, match="uint8"):
        pipe.nelbo_bpd(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"shape \[N, 1, 28, 28\]"):
        pipe.encode(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"model-space data must be float \[N, 2, 14, 14\]"):
        pipe.decode(torch.zeros(2, 2, 7, 7))
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        NDMPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a saved model nor a run directory"):
        NDMPipeline.from_pretrained(tmp_path / "empty")


def test_encode_is_the_posterior_mean_and_decode_gives_images(run_dir: Path, vae_dir: Path) -> None:
    pipe = NDMPipeline.from_pretrained(run_dir)
    images = _images(5, seed=1)
    z = pipe.encode(images)
    with torch.no_grad():
        expected = VAE.from_pretrained(vae_dir).posterior(VAE.from_uint8(images)).mean  # stage 2 froze the VAE
    assert z.shape == (5, 2, 14, 14) and z.dtype == torch.float32 and torch.equal(z, expected)
    torch.testing.assert_close(pipe.encode(images, batch_size=2), z)  # batched alike up to float round-off
    s1 = pipe.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    s2 = pipe.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, z)
    x = pipe.decode(z)
    assert x.dtype == torch.uint8 and x.shape == images.shape


def test_ode_variant_shares_z0_with_the_nelbo_and_its_prior_term_has_the_closed_form() -> None:
    """F = identity and an untrained prior: the zero-initialised output layer gives eps_hat = 0, so
    xhat = z/alpha_t and the probability flow is dz/dt = (alpha_t'/alpha_t) z, which carries alpha_0 z0 to
    alpha_1 z0 with divergence integral D log(alpha_1/alpha_0): -log p_ODE(z0) = -log N(alpha_1 z0; 0, I)
    - D log alpha_1, exactly (Rademacher probes are exact on the diagonal Jacobian)."""
    torch.manual_seed(0)
    cfg = load_config("configs/latent_ndm_mnist.yaml", ["model.transform=identity", "model.mixing=false", *NETS],
                      schema=LatentRunConfig)
    model = ImageModel(LatentCodec(VAE(TINY_VAE), frozen=True), build_ndm(cfg.model, 2, 4)).eval()  # 2x4x4 latents
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([7, 2, 40])
    ode = evaluate_ode_nll(model, images, ids, probes=2, seed=5, rtol=1e-3, atol=1e-3)
    nelbo = evaluate_nelbo(model, images, ids, seed=5)
    assert ode["decoder_bpd"] == nelbo["decoder_bpd"] and ode["log_q_bpd"] == nelbo["log_q_bpd"]
    assert ode["bpd"] == pytest.approx(ode["decoder_bpd"] + ode["log_q_bpd"] + ode["ode_nll_bpd"])
    assert ode["nfe_mean"] > 0 and ode["seconds"] > 0 and ode["num_images"] == 3
    # Independently: z0 is the first draw of each example's keyed noise.
    with torch.no_grad():
        q = model.codec.vae.posterior(VAE.from_uint8(images))
        z0 = (q.mean + q.std * Noise.per_example(ids.tolist(), "cpu", 5, "joint", 0).normal(q.mean)).double()
        alpha_1 = torch.sigmoid(-model.ndm.gamma(torch.ones(1, dtype=torch.float64))).sqrt()
    dims = z0[0].numel()
    nats = 0.5 * (alpha_1 * z0).square().flatten(1).sum(1) + 0.5 * dims * math.log(2 * math.pi) \
        - dims * alpha_1.log()
    assert ode["ode_nll_bpd"] == pytest.approx(bits_per_dim(nats, 64).mean().item(), rel=2e-4)


@pytest.mark.slow  # an end-to-end command-line run
def test_cli_sample_and_evaluate_a_latent_model(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    saved = NDMPipeline.from_pretrained(run_dir).save_pretrained(tmp_path / "model")
    assert main(["sample", str(saved), "--num", "5", "--steps", "2", "--batch-size", "3",
                 "--out", str(tmp_path / "s")]) == 0
    report = json.loads(capsys.readouterr().out)
    data = np.load(report["npz"])
    assert data["images"].shape == (5, 1, 28, 28) and data["images"].dtype == np.uint8
    assert Path(report["png"]).is_file() and report["nfe_xhat"] == 2

    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run_dir), "--metrics", "nelbo,ode_nll", "--steps", "continuous",
                 "--num-images", "6", "--ode-images", "2", "--rtol", "1e-2", "--atol", "1e-2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    nelbo, ode = report["nelbo"]["continuous"], report["ode_nll"]
    assert nelbo["num_images"] == 6 and math.isfinite(nelbo["bpd"]) and "prior_nelbo_bpd" in nelbo
    assert ode["num_images"] == 2 and math.isfinite(ode["bpd"]) and ode["nfe_mean"] > 0 and "seconds" in ode
    assert {"decoder_bpd", "log_q_bpd", "ode_nll_bpd", "bpd_stderr"} <= ode.keys()
