"""Reliability: kill -9 and resume, SIGTERM, non-finite steps, damaged checkpoints, a full disk, bad input."""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import losses, tiny

from latent_ndm.cli import main
from latent_ndm.core.codec import PixelCodec
from latent_ndm.core.loss import NDMLoss
from latent_ndm.experiments.crashtest import run as crashtest
from latent_ndm.nets.build import build_ndm
from latent_ndm.tasks.pixel import pixel_task
from latent_ndm.tasks.runs import build_model, load_run
from latent_ndm.training import checkpoint as ckpt_mod
from latent_ndm.training.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    checkpoint_dirs,
    latest_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from latent_ndm.training.loop import TrainingInterrupted, train


def weights(run_dir: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / f"{name}.safetensors"))


@pytest.mark.slow  # an end-to-end command-line run
def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path: Path, mnist_shards: Path) -> None:
    s = crashtest(trials=2, steps=10, ckpt_every=1, out=tmp_path, shards=mnist_shards,
                  config="configs/ndm_mnist.yaml", seed=1)
    assert s["trials"] >= 2 and s["resumes_ok"] == s["resumes"], s["runs"]
    assert s["all_checkpoints_verify"] and s["max_steps_lost"] <= 1
    assert s["bitwise_equal"], s["differences"]
    assert s["ok"]


class _Faulty:
    """Wraps an objective: at the given steps its loss (or only its gradient) is NaN; SIGTERM at one step."""

    def __init__(self, objective, nan_loss=(), nan_grad=(), sigterm_at=None):
        self.objective, self.nan_loss, self.nan_grad, self.sigterm_at = objective, nan_loss, nan_grad, sigterm_at
        self.loss_scale = objective.loss_scale

    def __getattr__(self, name):  # end_step, state_dict, load_state_dict: the wrapped objective's
        return getattr(self.objective, name)

    def __call__(self, model, images, noise, step):
        nats, metrics = self.objective(model, images, noise, step)
        if step == self.sigterm_at:
            signal.raise_signal(signal.SIGTERM)
        if step in self.nan_loss:
            nats = nats * float("nan")
        if step in self.nan_grad:  # finite loss, infinite gradient: d sqrt(u)/du at u = 0, times 0
            p = next(model.parameters())
            nats = nats + 0.0 * torch.sqrt((p - p.detach()).abs().sum())
        return nats, metrics


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path: Path, mnist_shards: Path) -> None:
    cfg = tiny(tmp_path, "nan", "train.steps=6", "train.ckpt_every=2", "train.max_nonfinite_steps=3",
               shards=mnist_shards)
    task = pixel_task(cfg)
    task.objective = _Faulty(task.objective, nan_loss=(1, 2), nan_grad=(4,))
    train(cfg, task)
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 3, 3]
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[4]["loss"]) and math.isnan(rows[4]["grad_norm"])
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "nan").values())

    # Non-finite from step 4 on: steps 4, 5, 6 are skipped, then the run stops; the checkpoints stay good.
    cfg = tiny(tmp_path, "dies", "train.steps=10", "train.ckpt_every=4", "train.max_nonfinite_steps=3",
               shards=mnist_shards)
    task = pixel_task(cfg)
    task.objective = _Faulty(task.objective, nan_loss=range(4, 10))
    with pytest.raises(FloatingPointError, match=r"3 non-finite steps in a row \(steps 4-6\).*step 4"):
        train(cfg, task)
    (good,) = checkpoint_dirs(tmp_path / "dies")
    verify_checkpoint(good)
    assert good.name == "step_00000004" and all(torch.isfinite(v).all() for v in weights(tmp_path / "dies").values())


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, {"model": net}, {"step": 1})
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="model.weight is not finite"):
        save_checkpoint(tmp_path, 2, {"model": net}, {"step": 2})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000001"]


def test_sigterm_checkpoints_the_current_step_and_the_resume_is_exact(tmp_path: Path, mnist_shards: Path) -> None:
    full = tiny(tmp_path, "full", "train.steps=7", "train.ckpt_every=0", shards=mnist_shards)
    train(full, pixel_task(full))
    cfg = tiny(tmp_path, "term", "train.steps=7", "train.ckpt_every=0", shards=mnist_shards)
    task = pixel_task(cfg)
    task.objective = _Faulty(task.objective, sigterm_at=2)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped at step 3") as e:
        train(cfg, task)
    assert e.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is previous
    assert not (tmp_path / "term" / "train.lock").exists()  # released on SIGTERM (the restart below relies on it)
    assert [p.name for p in checkpoint_dirs(tmp_path / "term")] == ["step_00000003"]  # no step lost
    again = tiny(tmp_path, "term", "train.steps=7", "train.ckpt_every=0", shards=mnist_shards)
    train(again, pixel_task(again))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "term")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "term")


@pytest.fixture
def two_checkpoints(tmp_path: Path, mnist_shards: Path) -> Path:
    cfg = tiny(tmp_path, "two", "train.steps=2", "train.ckpt_every=1", shards=mnist_shards)
    train(cfg, pixel_task(cfg))
    return tmp_path / "two"


def test_damaged_checkpoints_are_clear_errors_and_resume_falls_back(two_checkpoints: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run = two_checkpoints
    first, second = checkpoint_dirs(run)
    f = second / "ema.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern in the weights: same size, parses fine, wrong numbers
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ema.safetensors differ from what was written"):
        load_run(run)
    assert main(["sample", str(run), "--num", "2"]) == 1
    assert "damaged" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="resuming from an earlier checkpoint"):
        assert resume_checkpoint(run) == first
    with open(first / "state.pt", "r+b") as fh:
        fh.truncate(100)
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match=r"(?s)no usable checkpoint.*truncated"):
        warnings.simplefilter("ignore")
        resume_checkpoint(run)

    # A weights file that is not safetensors at all, or that belongs to another model.
    bad = run / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        ckpt_mod.load_weights(torch.nn.Linear(2, 2), bad)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        ckpt_mod.load_weights(torch.nn.Linear(2, 2), first / "model.safetensors")
    (run / "config.json").write_text('{"model": ')  # cut short
    assert main(["evaluate", str(run)]) == 1
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(two_checkpoints: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = two_checkpoints
    before = checkpoint_dirs(run)
    model = build_model(load_run(run)[0])

    def full_disk(obj, f, *args, **kwargs):  # what a full disk does: part of the bytes, then ENOSPC
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*step_00000002 is intact") as e:
        save_checkpoint(run, 3, {"model": model}, {"step": 3})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert checkpoint_dirs(run) == before and not list((run / "checkpoints").glob(".tmp_*"))
    verify_checkpoint(before[-1])


def test_a_real_file_size_limit_stops_training_with_a_clear_message(two_checkpoints: Path, mnist_shards: Path) -> None:
    """The OS refuses the write (RLIMIT_FSIZE, EFBIG), as a full disk would (ENOSPC): the run stops with
    one line naming the intact checkpoint, and a rerun without the limit resumes from it."""
    run = two_checkpoints
    limit = (run / "checkpoints" / "step_00000002" / "model.safetensors").stat().st_size // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [f"name={run.name}", f"out_dir={run.parent}", "train.batch_size=16", f"data.shards={mnist_shards}",
            "data.num_workers=1", "train.lr=2e-3", "train.warmup_steps=5", "train.log_every=1",
            "train.eval_every=0", "train.sample_every=0", "train.steps=4", "train.ckpt_every=1",
            "eval.final_examples=16",
            *[f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]",
                                                                                "groups=4")]]
    proc = subprocess.run([sys.executable, "-m", "latent_ndm.cli", "train", "configs/ndm_mnist.yaml", *args],
                          preexec_fn=limited, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: [Errno 27] could not write the checkpoint of step 3") and "File too large" in last
    assert "step_00000002 is intact" in last
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000001", "step_00000002"]
    cfg = tiny(run.parent, run.name, "train.steps=4", "train.ckpt_every=1", shards=mnist_shards)
    train(cfg, pixel_task(cfg))
    assert latest_checkpoint(run).name == "step_00000004" and len(losses(run)) == 4


# -- bad input: one clear error, a non-zero exit, nothing written -----------------------------------------------

TRAIN = ["train", "configs/ndm_mnist.yaml"]
BAD_CLI = {
    "missing config file": (["train", "configs/no_such.yaml"], "no_such.yaml"),
    "unknown key": ([*TRAIN, "train.stepz=3"], "stepz"),
    "wrong type": ([*TRAIN, "train.batch_size=many"], "train.batch_size"),
    "negative learning rate": ([*TRAIN, "train.lr=-1e-3"], "train.lr = -0.001 must be > 0"),
    "image size the U-Net cannot downsample": ([*TRAIN, "data.image_size=27"], "must be divisible by 2"),
    "unknown dF/dt method": ([*TRAIN, "model.fdot=magic"], "model.fdot = 'magic'; choose one of"),
    "batch not a multiple of the lanes": ([*TRAIN, "train.batch_size=10", "data.lanes=4"], "multiple of data.lanes"),
    "missing shards": ([*TRAIN, "data.shards=/no/such/shards"], "/no/such/shards"),
    "wrong channels for the data": ([*TRAIN, "data.channels=3"], "holds 1x28x28 (C x H x W) images but the config "
                                                               "says data.channels=3"),
    "missing run directory (evaluate)": (["evaluate", "/no/such/run"], "/no/such/run does not exist"),
    "missing run directory (sample)": (["sample", "/no/such/run"], "/no/such/run does not exist"),
    "missing run directory (pictures)": (["pictures", "/no/such/run"], "/no/such/run does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_cli_input_is_one_clear_error(case: str, tmp_path: Path, mnist_shards: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    argv, expected = BAD_CLI[case]
    if argv[0] == "train":
        shards = [] if any(a.startswith("data.shards") for a in argv) else [f"data.shards={mnist_shards}"]
        nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]")]
        argv = [*argv, f"out_dir={tmp_path}", "name=bad", "train.steps=1", *shards, *nets]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and expected in err[-1], err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_empty_image_folder_and_bad_python_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from latent_ndm.data.writer import main as make_shards_main

    (tmp_path / "empty").mkdir()
    assert make_shards_main(["folder", str(tmp_path / "out"), "--root", str(tmp_path / "empty"),
                             "--test-fraction", "0.1"]) == 1
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()

    cfg = tiny(tmp_path, "api", shards=tmp_path)
    ndm = build_ndm(cfg.model, 1, 28)
    nelbo = NDMLoss().eval()  # the API's loss: uniform t, the input checks all on
    good, _ = PixelCodec().encode(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expects float data"):
        nelbo(ndm, torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"lie in \[-1, 1\]; got values in \[255, 255\]"):
        nelbo(ndm, good * 0 + 255.0)
    with pytest.raises(ValueError, match=r"UNet expects x of shape \[B, 1, H, W\]"):
        nelbo(ndm, torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="built for 28x28"):
        nelbo(ndm, torch.zeros(2, 1, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        PixelCodec().encode(torch.zeros(2, 1, 28, 28))
    assert torch.isfinite(sum(nelbo(ndm, good, torch.Generator().manual_seed(0)).values())).all()
    torch.manual_seed(5)
    a = nelbo(ndm, good)["diff"]  # no generator: torch's global RNG, so manual_seed repeats it
    torch.manual_seed(5)
    assert torch.equal(a, nelbo(ndm, good)["diff"])


def test_a_start_that_failed_before_any_checkpoint_does_not_block_the_corrected_one(tmp_path: Path,
                                                                                    mnist_shards: Path) -> None:
    args = ["train", "configs/ndm_mnist.yaml", f"out_dir={tmp_path}", "name=retry", "train.steps=2",
            "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.sample_every=0",
            "eval.final_examples=16",
            *[f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]")]]
    assert main([*args, "data.shards=/no/such/shards"]) == 1
    assert not (tmp_path / "retry" / "train.lock").exists()  # released on an error, in this very process
    (tmp_path / "retry" / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "lo')  # stale rows
    assert main([*args, f"data.shards={mnist_shards}"]) == 0
    assert [r["step"] for r in map(json.loads, (tmp_path / "retry" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2]
    assert 99.0 not in losses(tmp_path / "retry")
