"""The Python API and the command line on a tiny trained run: save/load, sampling, evaluation, pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_ndm.cli import main
from latent_ndm.config import load_config
from latent_ndm.pipeline import NDMPipeline
from latent_ndm.tasks.pixel import pixel_task
from latent_ndm.training.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, mnist_shards: Path) -> Path:
    out = tmp_path_factory.mktemp("runs")
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]",
                                                                             "groups=4")]
    cfg = load_config("configs/ndm_mnist.yaml", [f"out_dir={out}", "name=api", "train.steps=3", "train.batch_size=8",
                                                 "train.eval_every=0", "train.sample_every=0", "eval.final_examples=16",
                                                 f"data.shards={mnist_shards}", *nets])
    train(cfg, pixel_task(cfg))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return out / "api"


def test_save_and_load_round_trip_gives_identical_samples(run_dir: Path, tmp_path: Path) -> None:
    pipe = NDMPipeline.from_pretrained(run_dir)
    saved = pipe.save_pretrained(tmp_path / "model")
    again = NDMPipeline.from_pretrained(saved)
    for a, b in zip(pipe.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    x1 = pipe.sample(4, "deterministic", 5, torch.Generator().manual_seed(3))
    x2 = again.sample(4, "deterministic", 5, torch.Generator().manual_seed(3))
    assert x1.dtype == torch.uint8 and x1.shape == (4, 1, 28, 28) and torch.equal(x1, x2)
    with pytest.raises(TypeError, match="uint8"):
        pipe.nelbo_bpd(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"shape \[N, 1, 28, 28\]"):
        pipe.nelbo_bpd(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        NDMPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a saved model"):
        NDMPipeline.from_pretrained(tmp_path / "empty")


@pytest.mark.slow  # an end-to-end command-line run
def test_cli_sample_evaluate_and_pictures(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", str(run_dir), "--num", "6", "--sampler", "ode_heun", "--steps", "3",
                 "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    data = np.load(report["npz"])
    assert data["images"].shape == (6, 1, 28, 28) and data["images"].dtype == np.uint8
    assert report["nfe_xhat"] == 6 and Path(report["png"]).is_file()
    # A tempered run is recorded as such and named apart, so it never overwrites the untempered grid.
    assert main(["sample", str(run_dir), "--num", "6", "--sampler", "ode_heun", "--steps", "3",
                 "--temperature", "0.5", "--out", str(tmp_path)]) == 0
    cold = json.loads(capsys.readouterr().out)
    assert cold["temperature"] == 0.5 and cold["npz"].endswith("_temp0.5.npz") and cold["npz"] != report["npz"]
    assert float(np.load(cold["npz"])["temperature"]) == 0.5
    # Autoguidance by one checkpoint of the run (here its newest, the model itself: the images must not change).
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert main(["sample", str(run_dir), "--num", "6", "--sampler", "ode_heun", "--steps", "3",
                 "--guide", str(ckpt), "--guidance", "3", "--out", str(tmp_path)]) == 0
    guided = json.loads(capsys.readouterr().out)
    assert guided["guidance"] == 3 and guided["npz"].endswith("_guide3.npz") and guided["nfe_guide"] == 6
    assert np.array_equal(np.load(guided["npz"])["images"], data["images"])
    assert main(["sample", str(run_dir), "--guidance", "3"]) == 1  # a weight without a guide: a clear error
    assert "--guidance needs --guide" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--metrics", "nelbo", "--guide", str(ckpt)]) == 1  # nothing to guide
    assert "sample-quality metrics" in capsys.readouterr().err

    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run_dir), "--metrics", "nelbo,ode_nll", "--steps", "10,continuous",
                 "--num-images", "20", "--ode-images", "2", "--rtol", "1e-3", "--atol", "1e-3",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["nelbo"]) >= {"T=10", "continuous"} and report["nelbo"]["T=10"]["num_images"] == 20
    assert report["ode_nll"]["bpd"] > 0 and report["ode_nll"]["nfe_mean"] > 0

    assert main(["pictures", str(run_dir), "--num", "3", "--steps", "7", "--out", str(tmp_path / "pics")]) == 0
    for name in ("transform.png", "transform_diff.png", "trajectories.png"):
        assert (tmp_path / "pics" / name).is_file()
    assert main(["sample", str(run_dir), "--sampler", "euler"]) == 1  # a clear error, non-zero exit
    assert "unknown sampler 'euler'" in capsys.readouterr().err


def test_the_package_exports_its_public_api() -> None:
    import latent_ndm
    from latent_ndm import NDM, SAMPLERS, NDMPipeline, load_pipeline
    from latent_ndm.core.ndm import NDM as CoreNDM
    from latent_ndm.pipeline import NDMPipeline as PipelineClass

    assert NDM is CoreNDM and NDMPipeline is PipelineClass and callable(load_pipeline) and "ancestral" in SAMPLERS
    for name in latent_ndm.__all__:  # every advertised name resolves
        assert getattr(latent_ndm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        latent_ndm.nope  # noqa: B018
