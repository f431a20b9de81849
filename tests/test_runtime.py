"""Where commands run: device choice, the precision policy around F, compiled / channels_last training equal
to eager, and evaluation and sampling under two processes equal to one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_ndm.config import load_config
from latent_ndm.core.loss import NDMLoss
from latent_ndm.pipeline import NDMPipeline
from latent_ndm.runtime import allow_tf32, full_fp32, resolve_device, tf32_state
from latent_ndm.tasks.pixel import build_pixel_model

TINY = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]",
                                                                         "groups=4", "dropout=0.0")]


def tiny_cfg(shards: Path, *overrides: str):
    return load_config("configs/ndm_mnist.yaml", [f"data.shards={shards}", *TINY, *overrides])


def test_devices_resolve_and_unusable_cuda_is_a_clear_error() -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: .*use --device cpu"):
            resolve_device("cuda")


def test_f_runs_without_tf32_while_the_denoiser_may_use_it(mnist_shards: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    model = build_pixel_model(tiny_cfg(mnist_shards))
    seen: dict[str, list] = {"F": [], "denoiser": []}
    f_net, d_net = model.ndm.transform.net, model.ndm.denoiser.net
    d_net.register_forward_pre_hook(lambda *_: seen["denoiser"].append(tf32_state()))
    f_net.register_forward_pre_hook(lambda *_: seen["F"].append(tf32_state()))
    tangent = f_net.forward_and_time_derivative

    def recorded(*args):
        seen["F"].append(tf32_state())
        return tangent(*args)

    monkeypatch.setattr(f_net, "forward_and_time_derivative", recorded)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        allow_tf32(True)
        x = torch.rand(4, 1, 28, 28) * 2 - 1
        for fdot in ("tangent", "jvp"):  # both ways of computing dF/dt
            model.ndm.transform.fdot_method = fdot
            NDMLoss().eval()(model.ndm, x)
        with torch.no_grad():
            model.ndm.ode_drift(x, torch.full((4,), 0.5))
        assert tf32_state() == (True, True)  # restored after every F call
        with full_fp32():
            assert tf32_state() == (False, False)
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
    assert len(seen["F"]) >= 3 and set(seen["F"]) == {(False, False)}
    assert len(seen["denoiser"]) >= 2 and set(seen["denoiser"]) == {(True, True)}


@pytest.mark.slow  # compiles a U-Net
def test_compiled_channels_last_training_matches_eager(mnist_shards: Path, tmp_path: Path) -> None:
    """torch.compile's graph capture and AOT autograd of the denoiser (backend aot_eager: inductor's code
    generation alone takes ~90 s on 2 CPU cores, too long for the suite; scripts/gpu_check.sh compiles with
    inductor), in place inside training, with NHWC tensors, against eager."""
    from latent_ndm.tasks.pixel import pixel_task
    from latent_ndm.training.loop import train

    losses = {}
    for name, extra in (("eager", []), ("fast", ["train.compile=true", "train.compile_backend=aot_eager",
                                                             "train.channels_last=true"])):
        cfg = tiny_cfg(mnist_shards, f"out_dir={tmp_path}", f"name={name}", "train.steps=3", "train.batch_size=8",
                       "train.log_every=1", "train.eval_every=0", "train.sample_every=0", "train.ckpt_every=3",
                       "train.warmup_steps=1", "data.num_workers=0", "eval.final_examples=8", *extra)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            task = pixel_task(cfg)
            run_dir = train(cfg, task)
        # Compiled in place: the module is the same, its calls go through torch.compile.
        assert (getattr(task.model.ndm.denoiser.net, "_compiled_call_impl", None) is not None) == (name == "fast")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["eager"]) == 3
    np.testing.assert_allclose(losses["fast"], losses["eager"], rtol=1e-4)


def _cli(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "latent_ndm.cli", *args]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "latent_ndm.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow  # four command-line runs, two of them under torchrun
def test_two_processes_sample_and_evaluate_exactly_as_one(mnist_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(mnist_shards)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_pixel_model(cfg)
    path = NDMPipeline(model, (1, 28, 28), cfg).save_pretrained(tmp_path / "model")
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        sample = _cli(["sample", str(path), "-n", "10", "--batch-size", "4", "--steps", "3", "--seed", "5",
                       "--device", "cpu", "--out", str(out)], processes)
        assert "sample: device cpu" in sample.stderr and f"{processes} process" in sample.stderr
        images = np.load(out / "ancestral_steps3_seed5.npz")["images"]
        report = _cli(["evaluate", str(path), "--metrics", "nelbo", "--steps", "continuous", "--num-images", "30",
                       "--device", "cpu", "--out", str(out / "eval.json")], processes)
        assert "evaluate: device cpu" in report.stderr
        results[processes] = (images, json.loads((out / "eval.json").read_text()))
    (a, ra), (b, rb) = results[1], results[2]
    assert a.shape == (10, 1, 28, 28) and np.array_equal(a, b)  # bitwise the same samples
    assert rb["processes"] == 2 and ra["nelbo"]["num_images"] == rb["nelbo"]["num_images"] == 30
    assert ra["nelbo"]["continuous"]["bpd"] == pytest.approx(rb["nelbo"]["continuous"]["bpd"], rel=1e-12)


@pytest.mark.slow  # builds and times every model of the check once
def test_gpu_check_runs_on_a_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latent_ndm.experiments import benchmark, benchmark_convs, gpu_check

    # The matmul peak (up to 3072^3 products, ~20 s on 2 cores over the check) at a small size: the test
    # checks the wiring, not the figure.
    small = lambda dtype, device="cpu": benchmark_convs.matmul_peak(dtype, device, sizes=(256,), reps=1)  # noqa: E731
    monkeypatch.setattr(benchmark, "matmul_peak", small)
    monkeypatch.setattr(gpu_check, "matmul_peak", small)

    assert gpu_check.main(["--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path / "check")]) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    nelbo = report["nelbo_device_vs_cpu"]
    assert nelbo["ok"] and nelbo["max_relative_difference"] == 0.0  # the CPU against itself: identical
    pixel = report["pixel_training"]["eager"]
    assert set(pixel) >= {"baseline (F = identity, continuous)", "NDM continuous", "_peaks_gflops"}
    ndm = pixel["NDM continuous"]
    assert ndm["flop_ratio_to_baseline"] > 1 and ndm["time_ratio_over_flop_ratio"] > 0 and ndm["peak_memory_gib"] > 0
    assert report["latent_training"]["eager"]["images_per_sec"] > 0
    assert "NELBO of a fixed batch" in (tmp_path / "check.md").read_text()
