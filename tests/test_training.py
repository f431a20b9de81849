"""The training loop on real MNIST: the loss falls, and checkpoint + resume is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from latent_ndm.config import ConfigError, load_config
from latent_ndm.tasks.pixel import pixel_task
from latent_ndm.tasks.runs import load_run
from latent_ndm.training import guards as train_module
from latent_ndm.training.checkpoint import checkpoint_dirs, latest_checkpoint
from latent_ndm.training.loop import train
from latent_ndm.training.step import lr_factor

TINY_NET = ["channels=8", "channel_mult=[1,2]", "groups=4"]


def tiny(tmp_path: Path, name: str, *extra: str, shards: Path):
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in TINY_NET]
    return load_config("configs/ndm_mnist.yaml", [f"name={name}", f"out_dir={tmp_path}", "train.batch_size=16",
                                                  f"data.shards={shards}", "data.num_workers=1",
                                                  "train.lr=2e-3", "train.warmup_steps=5", "train.log_every=1",
                                                  "train.eval_every=0", "train.sample_every=0",
                                                  "eval.final_examples=16", *nets, *extra])


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_falls_on_mnist(tmp_path: Path, mnist_shards: Path) -> None:
    cfg = tiny(tmp_path, "falls", "train.steps=50", "train.ckpt_every=0", "train.eval_every=50",
               "train.eval_examples=64", "train.sample_every=50", "train.num_samples=4", "train.sample_steps=5",
               shards=mnist_shards)
    run_dir = train(cfg, pixel_task(cfg))
    loss = losses(run_dir)
    assert len(loss) == 50
    assert sum(loss[-10:]) / 10 < 0.6 * sum(loss[:5]) / 5, loss
    assert (run_dir / "samples" / "step_00000050.png").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("test_bpd" in r for r in rows)
    _, model = load_run(run_dir)  # the saved run loads back
    assert model.ndm.num_steps == 0
    report = json.loads((run_dir / "test_report.json").read_text())["nelbo"]  # every run kind writes one
    assert report["num_images"] == 16 and report["bpd"] == pytest.approx(
        report["rec_bpd"] + report["diff_bpd"] + report["prior_bpd"], rel=1e-9)


def test_resume_is_exact(tmp_path: Path, mnist_shards: Path) -> None:
    """6 steps + resume to 9 equals 9 uninterrupted steps: weights, optimizer and logged losses."""
    common = ("train.ckpt_every=3", "train.steps=9")
    full = tiny(tmp_path, "full", *common, shards=mnist_shards)
    train(full, pixel_task(full))

    part = tiny(tmp_path, "part", "train.ckpt_every=3", "train.steps=6", shards=mnist_shards)
    train(part, pixel_task(part))
    assert [p.name for p in checkpoint_dirs(tmp_path / "part")] == ["step_00000003", "step_00000006"]
    resumed = tiny(tmp_path, "part", *common, shards=mnist_shards)  # only train.steps changed: allowed
    train(resumed, pixel_task(resumed))

    a, b = (torch.load(latest_checkpoint(tmp_path / n) / "state.pt", weights_only=True) for n in ("full", "part"))
    assert a["step"] == b["step"] == 9
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    _, ma = load_run(tmp_path / "full", ema=False)
    _, mb = load_run(tmp_path / "part", ema=False)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_resume_with_a_different_model_is_refused(tmp_path: Path, mnist_shards: Path) -> None:
    cfg = tiny(tmp_path, "r", "train.steps=2", "train.ckpt_every=2", shards=mnist_shards)
    train(cfg, pixel_task(cfg))
    # A key added to the configs after the run started (here: as if model.mixing were new) is not a change.
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    del saved["model"]["mixing"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    longer = tiny(tmp_path, "r", "train.steps=3", "train.ckpt_every=3", shards=mnist_shards)
    train(longer, pixel_task(longer))
    other = tiny(tmp_path, "r", "train.steps=4", "model.num_steps=10", shards=mnist_shards)
    try:
        train(other, pixel_task(other))
    except ConfigError as e:
        assert "model.num_steps: 0 -> 10" in str(e)
    else:
        raise AssertionError("resuming with a different model config was not refused")


def test_bf16_autocast_training_runs_and_keeps_float32_weights(tmp_path: Path, mnist_shards: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(tmp_path, "bf16", "train.steps=4", "train.ckpt_every=4", "train.bf16=true", shards=mnist_shards)
    # Where bf16 has no kernels the run goes on (right numerics, scalar speed) but says why it is slow.
    monkeypatch.setattr(train_module, "bf16_fast", lambda device: False)
    with pytest.warns(UserWarning, match="no bf16 kernels"):
        run_dir = train(cfg, pixel_task(cfg))
    loss = losses(run_dir)
    assert len(loss) == 4 and all(math.isfinite(v) for v in loss)
    _, model = load_run(run_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # EMA and weights stay fp32


def test_gradient_accumulation_equals_the_whole_batch(tmp_path: Path, mnist_shards: Path) -> None:
    """2 micro-batches of 8 give the step of one batch of 16: the same keyed noise, the same t proposal
    update, gradients summed; weights and logged losses agree to float round-off (not bitwise: the sums
    are taken in another order)."""
    common = ("train.steps=3", "train.ckpt_every=0", "data.lanes=2", "train.ema_decay=0")
    whole = tiny(tmp_path, "whole", *common, shards=mnist_shards)
    train(whole, pixel_task(whole))
    parts = tiny(tmp_path, "parts", *common, "train.grad_accum=2", shards=mnist_shards)
    train(parts, pixel_task(parts))
    _, a = load_run(tmp_path / "whole", ema=False)
    _, b = load_run(tmp_path / "parts", ema=False)
    changed = 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    init = pixel_task(whole).model  # the same seed: the initial weights
    changed = sum(not torch.equal(p, q) for p, q in zip(a.parameters(), init.parameters()))
    assert changed > 0
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "whole")), torch.tensor(losses(tmp_path / "parts")),
                               rtol=1e-5, atol=0)
    bad = tiny(tmp_path, "bad", *common, "train.grad_accum=4", shards=mnist_shards)
    with pytest.raises(ConfigError, match="grad_accum=4 must divide the 2 data lanes"):
        train(bad, pixel_task(bad))


def test_learning_rate_schedules() -> None:
    warm = [lr_factor(s, 4) for s in range(6)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # linear warm-up, then constant
    cos = [lr_factor(s, 2, "cosine", 10, 0.1) for s in range(12)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == 1.0 and cos[10] == pytest.approx(0.1) and cos[11] == pytest.approx(0.1)
    # Half-way through the decay: the mean of the peak and the floor.
    assert cos[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(x >= y for x, y in zip(cos[2:], cos[3:]))
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor(5, 2, "linear", 10)


def test_a_skipped_non_finite_step_leaves_the_t_proposal_alone() -> None:
    """The proposal learns from an applied step's losses only: a NaN would make every later t NaN."""
    from latent_ndm.core.loss import NDMLoss
    from latent_ndm.core.noise import Noise
    from latent_ndm.core.timesteps import ImportanceSampler
    from latent_ndm.experiments.toy2d import build_toy_ndm
    from latent_ndm.training.step import train_step

    ndm, loss = build_toy_ndm("neural", hidden=8, depth=1), NDMLoss(ImportanceSampler(bins=4))
    poison = {"on": True}

    def objective(x, noise, step):
        nats = sum(loss(ndm, x, noise).values())
        return (nats * float("nan") if poison["on"] else nats), {}

    model = torch.nn.Module()
    model.forward, model.ndm = objective, ndm
    opt = torch.optim.AdamW(ndm.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    before = loss.proposal.state_dict()
    res = train_step(model, [(x, Noise.from_generator(torch.Generator().manual_seed(1), 8))], 0, 1.0, opt, sched,
                     end_step=loss.update_proposal)
    after = loss.proposal.state_dict()
    assert not res.applied and all(torch.equal(before[k], after[k]) for k in before)
    poison["on"] = False
    res = train_step(model, [(x, Noise.from_generator(torch.Generator().manual_seed(1), 8))], 1, 1.0, opt, sched,
                     end_step=loss.update_proposal)
    assert res.applied and loss.proposal.seen.sum() == 8 and torch.isfinite(loss.proposal.second_moment).all()
