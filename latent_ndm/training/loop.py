"""One generic training loop on accelerate, counted in steps.

It knows only `objective(model, images, noise, step) -> (per-example nats [B], metrics)`; the pixel
NDM, its baseline and (later) the VAE and the end-to-end latent model all train through it.

Data parallel: every process holds its lanes' part of the global batch (latent_ndm.data.streams), draws
noise keyed by (seed, step, lane), and reseeds its device RNG (dropout) from (seed, step, rank),
so nothing random is carried from step to step: a resumed run repeats an uninterrupted one, and
with a fixed data.lanes, 1 and 2 processes compute the same steps. Only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import Tensor, nn
from tqdm.auto import tqdm

from latent_ndm.config import ConfigError, RunConfig, config_diff, from_dict, to_dict
from latent_ndm.core.noise import Noise, derive_seed
from latent_ndm.data.streams import Batch
from latent_ndm.evaluation.images import save_grid
from latent_ndm.training.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    write_atomic,
)

# Keys that may change when a run is resumed (how long and how often, not what is trained; model.fdot only
# chooses how the same derivative dF/dt is computed).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.eval_every", "train.eval_examples",
                  "train.sample_every", "train.sample_steps", "train.num_samples", "train.ckpt_every",
                  "train.keep_checkpoints", "train.max_nonfinite_steps", "eval.", "model.fdot")


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint at `step` and stopped; rerunning resumes it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step = signum, step
        where = f"checkpoint {checkpoint}" if checkpoint else "checkpoint"
        super().__init__(f"{signal.Signals(signum).name} received: stopped at step {step} after writing its "
                         f"{where}; run the same command again to resume")


class _StopSignals:
    """Turns SIGTERM (pre-emption: schedulers send it before SIGKILL) and SIGINT (Ctrl-C) into a request
    to checkpoint and stop after the current step. A second signal acts as if no handler were set."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Objective(Protocol):
    loss_scale: float  # multiplies the mean per-example nats into the optimised loss (e.g. 1/(D ln 2))

    def __call__(self, model: nn.Module, images: Tensor, noise: Noise, step: int
                 ) -> tuple[Tensor, dict[str, Tensor]]: ...


@dataclass
class Task:
    """What the loop trains: a model, its objective, data, and optional evaluation and sampling."""

    model: nn.Module
    objective: Objective
    train_batches: Callable[[int], Iterator[Batch]]  # start step -> this process's batches, forever
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # called on every process
    sample: Callable[[nn.Module, torch.Generator], Tensor] | None = None  # -> uint8 images
    sample_nrow: int | None = None  # images per row of the sample grid (default: square)
    finish: Callable[[nn.Module, Path], None] | None = None  # rank 0, after the last step, with the eval model
    param_groups: Callable[[nn.Module], list[dict]] | None = None  # optimizer groups (default: one, train.lr)


class EMA:
    """Exponential moving average of the weights, always float32 (in bf16 a decay of 0.999 rounds
    to 1 and the average never moves). The effective decay ramps up as min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().float(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class MetricsLogger:
    """Metrics to runs/NAME/metrics.jsonl and, when the tensorboard package is installed, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()


def _check_config(run_dir: Path, cfg: RunConfig, allow_change: bool) -> None:
    saved = run_dir / "config.json"
    if not saved.exists() or not checkpoint_dirs(run_dir):
        return  # nothing to resume (e.g. a start that failed on bad data): the new config simply applies
    try:
        old = json.loads(saved.read_text())
    except ValueError as e:
        raise ConfigError(f"{saved} is unreadable ({e}); restore it or use a new run name") from e
    try:  # keys added since the run started take their defaults, which is what the run used
        old = to_dict(from_dict(type(cfg), old))
    except ConfigError:
        pass  # a key that no longer exists: the raw comparison below names it
    diff = config_diff(old, to_dict(cfg))
    blocking = [d for d in diff if not d.startswith(RESUMABLE_KEYS)]
    if blocking and not allow_change:
        raise ConfigError(
            f"{run_dir} was started with a different configuration:\n  " + "\n  ".join(blocking)
            + "\nUse a new run name, or pass --allow-config-change to resume anyway."
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint being resumed: those steps are about to be redone."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # the line a killed process was writing
            continue
        if keep:
            rows.append(line)
    write_atomic(path, "".join(r + "\n" for r in rows))


def bf16_fast(device: str | torch.device) -> bool:
    """Whether bf16 runs in hardware kernels here. Without them (a CPU lacking avx512_bf16/AMX) torch falls
    back to scalar code, below 1 GFLOP/s (about 100x slower than float32)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def train(cfg: RunConfig, task: Task, allow_config_change: bool = False) -> Path:
    """Train `task` for cfg.train.steps steps in runs/NAME, resuming from its latest checkpoint."""
    tc = cfg.train
    on_gpu = torch.cuda.is_available()
    if tc.bf16 and not bf16_fast("cuda" if on_gpu else "cpu"):
        # Not an error: the numerics are right, and a tiny run may want the bf16 path; but a real run would
        # look hung.
        warnings.warn("train.bf16=true, but this machine has no bf16 kernels (a CPU needs avx512_bf16 or AMX): "
                      "autocast falls back to scalar code, about 100x slower than float32 (train.bf16=false)",
                      stacklevel=2)
    accelerator = Accelerator(mixed_precision="bf16" if tc.bf16 else "no", cpu=not on_gpu)
    device, is_main = accelerator.device, accelerator.is_main_process
    run_dir = Path(cfg.out_dir) / cfg.name
    _check_config(run_dir, cfg, allow_config_change)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))

    # Model, EMA, optimizer, warm-up schedule.
    model = task.model.to(device)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    # Parameter groups may carry their own learning rate (e.g. the VAE and the prior in stage 3).
    params = task.param_groups(model) if task.param_groups is not None else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    modules = {"model": raw} | ({"ema": ema.model} if ema else {})

    # Resume. Rank 0 chooses the checkpoint for everyone (out_dir must be shared by all machines), so
    # that ranks never start from different steps.
    step, skipped, data_skipped, lanes, saved_step = 0, 0, 0, None, -1
    found = broadcast_object_list([str(resume_checkpoint(run_dir) or "") if is_main else None])[0]
    ckpt = Path(found) if found else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, modules)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, skipped = state["step"], state.get("skipped_steps", 0)
        # The saved count is the total over processes: rank 0 carries it on.
        data_skipped, lanes, saved_step = state.get("data_skipped", 0) if is_main else 0, state.get("data_lanes"), step
        accelerator.print(f"resumed from {ckpt} at step {step}")
    if is_main:  # rows logged after the checkpoint (or, from step 0, by an earlier start) are redone
        _truncate_metrics(run_dir / "metrics.jsonl", step)

    def total_data_skipped() -> int:  # a collective: every process calls it
        return int(accelerator.reduce(torch.tensor([data_skipped], device=device), "sum").item())

    def checkpoint() -> Path:
        nonlocal saved_step
        bad_data = total_data_skipped()
        path, error = run_dir / "checkpoints" / f"step_{step:08d}", None
        if is_main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "skipped_steps": skipped, "data_skipped": bad_data, "data_lanes": lanes}
            try:
                save_checkpoint(run_dir, step, modules, state, keep=tc.keep_checkpoints)
            except (OSError, FloatingPointError) as e:
                error = e
        # Every rank learns of a failed write and stops with it, rather than waiting for rank 0 forever.
        message = broadcast_object_list([str(error) if error else None])[0]
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(f"rank 0 could not write a checkpoint: {message}")
        saved_step = step
        accelerator.wait_for_everyone()
        return path

    def every(n: int) -> bool:
        return n > 0 and (step % n == 0 or step == tc.steps)

    logger = MetricsLogger(run_dir, is_main)
    stream = task.train_batches(step)
    eval_model = ema.model if ema else raw
    skipped_in_row, t_last, step_last = 0, time.perf_counter(), step
    # The bar closes before an error propagates, so the message starts on a line of its own.
    with _StopSignals() as stop, tqdm(total=tc.steps, initial=step, disable=not is_main, desc=cfg.name,
                                      dynamic_ncols=True) as bar:
        while step < tc.steps:
            batch = next(stream)
            if lanes is not None and batch.num_lanes != lanes:
                # data.lanes = 0 resolves to processes x workers: relaunching differently would change the data.
                raise ConfigError(f"this run was trained with {lanes} data lanes but now has {batch.num_lanes}; "
                                  f"resume with data.lanes={lanes}")
            lanes = batch.num_lanes
            data_skipped += batch.skipped
            torch.manual_seed(derive_seed(tc.seed, "device-rng", step, accelerator.process_index))  # dropout
            with accelerator.autocast():
                nats, metrics = task.objective(model, batch.images.to(device, non_blocking=True),
                                                batch.noise(tc.seed, step, device), step)
            loss = nats.mean() * task.objective.loss_scale
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            # One small collective per step: is the loss non-finite anywhere (grad_norm comes from all-reduced
            # gradients, so it is the same on every rank), and has any rank been asked to stop? Every rank
            # takes the same decisions.
            flags = torch.stack([~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm),
                                 torch.tensor(stop.received is not None, device=device)]).float()
            if accelerator.num_processes > 1:
                flags = accelerator.reduce(flags, "sum")
            nonfinite, stop_now = (v > 0 for v in flags.tolist())
            if not nonfinite:
                skipped_in_row = 0
                optimizer.step()
                scheduler.step()
                if ema:
                    ema.update(raw, step)
            else:
                # A non-finite step is counted but not applied: it would poison the weights and the EMA.
                skipped, skipped_in_row = skipped + 1, skipped_in_row + 1
                if skipped_in_row >= tc.max_nonfinite_steps > 0:
                    kept = (f"the last checkpoint (step {saved_step}, {run_dir / 'checkpoints'}) holds finite weights"
                            if saved_step >= 0 else "no checkpoint was written yet")
                    raise FloatingPointError(
                        f"{skipped_in_row} non-finite steps in a row (steps {step - skipped_in_row + 1}-{step}): "
                        f"training stopped; {kept}. Lower train.lr, check the data, or raise "
                        "train.max_nonfinite_steps.")
            # Flush the gradients now: their memory is not needed until the next backward.
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if every(tc.log_every):
                now = time.perf_counter()
                # Means over the global batch (a collective: every process takes part).
                local = torch.stack([loss.detach().float(), *(v.float() for v in metrics.values())])
                means = accelerator.reduce(local, "mean").tolist()
                bad_data = total_data_skipped()
                logged = {"loss": means[0], "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
                          "skipped_steps": skipped, "data_skipped": bad_data,
                          "sec_per_step": (now - t_last) / max(1, step - step_last)}
                logged |= dict(zip(metrics, means[1:]))
                t_last, step_last = now, step
                logger.log(step, logged)
                bar.set_postfix(loss=f"{logged['loss']:.4f}")
            if task.evaluate is not None and every(tc.eval_every):
                results = task.evaluate(eval_model)  # every process evaluates its share
                logger.log(step, {f"test_{k}": v for k, v in results.items()})
            if task.sample is not None and every(tc.sample_every) and is_main:
                images = task.sample(eval_model, torch.Generator(device).manual_seed(tc.seed))
                save_grid(images, run_dir / "samples" / f"step_{step:08d}.png", task.sample_nrow)
            if every(tc.ckpt_every):
                checkpoint()
            if stop_now and step < tc.steps:
                path = checkpoint() if saved_step != step else run_dir / "checkpoints" / f"step_{step:08d}"
                raise TrainingInterrupted(stop.received or signal.SIGTERM, step, path)
    if saved_step != step:
        checkpoint()
    if task.finish is not None and is_main:
        task.finish(eval_model, run_dir)
    accelerator.wait_for_everyone()
    # The process group stays up (no end_training): callers may evaluate across processes next.
    return run_dir


def summarize(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
