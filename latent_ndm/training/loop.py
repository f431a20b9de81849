"""One generic training loop on accelerate, counted in steps.

It knows only `objective(model, batch, noise, step) -> (per-example loss [B], metrics)`; the pixel NDM,
its baseline, the VAE and the latent model all train through it. Sections in order: setup, state and
resume, the loop (step, log, evaluate, sample, checkpoint), the end.

Data parallel: every process holds its lanes' part of the global batch (latent_ndm.data.streams), draws
noise keyed by (seed, step, lane), and reseeds its device RNG (dropout) from (seed, step, rank),
so nothing random is carried from step to step: a resumed run repeats an uninterrupted one, and
with a fixed data.lanes, 1 and 2 processes compute the same steps. Only rank 0 writes.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import Tensor, nn
from tqdm.auto import tqdm

from latent_ndm.config import RunConfig, to_dict
from latent_ndm.core.noise import Noise, derive_seed
from latent_ndm.data.streams import Batch
from latent_ndm.evaluation.images import save_grid
from latent_ndm.runtime import allow_tf32, announce, compile_denoiser
from latent_ndm.training.checkpoint import CheckpointError, resume_checkpoint, write_atomic
from latent_ndm.training.ema import EMA
from latent_ndm.training.guards import (
    StopSignals,
    TrainingInterrupted,
    check_config,
    check_lanes,
    check_nonfinite_streak,
    truncate_metrics,
    warn_slow_bf16,
)
from latent_ndm.training.runlock import RunLock, RunLockError
from latent_ndm.training.state import TrainState
from latent_ndm.training.step import lr_factor, train_step

__all__ = ["Objective", "Task", "TrainingInterrupted", "train"]


class Objective(Protocol):
    """objective(model, batch, noise, step) -> (per-example loss [B], metrics); optionally `end_step(applied)`,
    called on every process after each step (e.g. to update a proposal from the step's losses), and
    state_dict/load_state_dict for state that is checkpointed with the run."""

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
    finish_on_every_rank: bool = False  # finish runs on every process (it shares the work and writes on rank 0)
    param_groups: Callable[[nn.Module], list[dict]] | None = None  # optimizer groups (default: one, train.lr)


class _Trainee(nn.Module):
    """The model and its objective as one module whose forward is the objective, so that data parallelism
    sees one forward per step whatever the objective calls (an objective's own state, such as a t
    proposal, moves to the device with it)."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Tensor, noise: Noise, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective(self.model, batch, noise, step)


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


def _checkpoint(st: TrainState, run_dir: Path, keep: int, accelerator: Accelerator, lock: RunLock | None) -> Path:
    """Every process calls it; rank 0 writes, if it still owns the run directory. A failed write stops every
    rank with its error."""
    total_skipped = _total(st.data_skipped, accelerator)
    error = None
    if accelerator.is_main_process:
        try:
            if lock is not None:
                lock.check()
            st.save(run_dir, keep, total_skipped)
        except (OSError, FloatingPointError, RunLockError) as e:
            error = e
    message = broadcast_object_list([str(error) if error else None])[0]
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"rank 0 could not write a checkpoint: {message}")
    st.saved_step = st.step
    accelerator.wait_for_everyone()
    return run_dir / "checkpoints" / f"step_{st.step:08d}"


def _total(count: int, accelerator: Accelerator) -> int:  # a collective: every process calls it
    return int(accelerator.reduce(torch.tensor([count], device=accelerator.device), "sum").item())


def _micro_batches(batch: Batch, k: int, seed: int, step: int, device: torch.device) -> list[tuple[Tensor, Noise]]:
    parts = batch.split(k) if k > 1 else [batch]
    return [(b.images.to(device, non_blocking=True), b.noise(seed, step, device)) for b in parts]


def train(cfg: RunConfig, task: Task, allow_config_change: bool = False) -> Path:
    """Train `task` for cfg.train.steps steps in runs/NAME, resuming from its latest checkpoint."""
    tc, on_gpu = cfg.train, torch.cuda.is_available()
    warn_slow_bf16(tc.bf16, "cuda" if on_gpu else "cpu")
    accelerator = Accelerator(mixed_precision="bf16" if tc.bf16 else "no", cpu=not on_gpu)
    device, is_main = accelerator.device, accelerator.is_main_process
    allow_tf32(tc.tf32)
    announce(f"train {cfg.name}", device, accelerator.num_processes, accelerator.process_index, tc.bf16)
    run_dir = Path(cfg.out_dir) / cfg.name
    # One job per run directory, claimed before anything is written; rank 0 holds the lock for the job.
    lock, refused = None, None
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockError as e:
            refused = str(e)
    refused = broadcast_object_list([refused])[0]
    if refused is not None:
        raise RunLockError(refused)
    try:
        return _train(cfg, task, accelerator, run_dir, lock, allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, task: Task, accelerator: Accelerator, run_dir: Path, lock: RunLock | None,
           allow_config_change: bool) -> Path:
    tc, device, is_main = cfg.train, accelerator.device, accelerator.is_main_process
    check_config(run_dir, cfg, allow_config_change)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))

    # Model, EMA, optimizer (parameter groups may carry their own learning rate), LR schedule stepped by hand
    # once per optimizer step (a prepared scheduler steps once per process).
    raw = task.model.to(device)
    if tc.channels_last:
        raw.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(task.param_groups(raw) if task.param_groups else raw.parameters(), lr=tc.lr,
                                  betas=tc.betas, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, tc.warmup_steps, tc.lr_schedule, tc.steps, tc.min_lr / tc.lr))
    objective = task.objective if hasattr(task.objective, "state_dict") else None
    st = TrainState(raw, EMA(raw, tc.ema_decay) if tc.ema_decay > 0 else None, optimizer, scheduler, objective)
    if tc.compile:  # after the EMA's copy (which stays eager); in place, so weights keep their names
        compile_denoiser(raw, tc.compile_backend)
    model, optimizer = accelerator.prepare(_Trainee(raw, task.objective).to(device), optimizer)

    # Resume. Rank 0 chooses the checkpoint for everyone (out_dir must be shared by all machines).
    found = broadcast_object_list([str(resume_checkpoint(run_dir) or "") if is_main else None])[0]
    if found:
        st.load(Path(found), is_main)
        accelerator.print(f"resumed from {found} at step {st.step}")
    if is_main:  # rows logged after the checkpoint (or, from step 0, by an earlier start) are redone
        truncate_metrics(run_dir / "metrics.jsonl", st.step)

    def every(n: int) -> bool:
        return n > 0 and (st.step % n == 0 or st.step == tc.steps)

    logger, stream = MetricsLogger(run_dir, is_main), task.train_batches(st.step)
    t_last, step_last = time.perf_counter(), st.step
    # The bar closes before an error propagates, so the message starts on a line of its own.
    with StopSignals() as stop, tqdm(total=tc.steps, initial=st.step, disable=not is_main, desc=cfg.name,
                                     dynamic_ncols=True) as bar:
        while st.step < tc.steps:
            batch = next(stream)
            check_lanes(st.data_lanes, batch.num_lanes)
            st.data_lanes, st.data_skipped = batch.num_lanes, st.data_skipped + batch.skipped
            torch.manual_seed(derive_seed(tc.seed, "device-rng", st.step, accelerator.process_index))  # dropout
            res = train_step(model, _micro_batches(batch, tc.grad_accum, tc.seed, st.step, device), st.step,
                             task.objective.loss_scale, optimizer, scheduler, tc.grad_clip, st.ema, raw,
                             getattr(task.objective, "end_step", None), accelerator,
                             lambda: stop.received is not None)
            st.skipped_in_row = 0 if res.applied else st.skipped_in_row + 1
            st.skipped_steps += not res.applied
            check_nonfinite_streak(st.skipped_in_row, st.step, tc.max_nonfinite_steps, st.saved_step, run_dir)
            st.step += 1
            bar.update(1)

            if every(tc.log_every):  # means over the global batch (a collective: every process takes part)
                local = torch.stack([res.loss.float(), *(v.float() for v in res.metrics.values())])
                means, now = accelerator.reduce(local, "mean").tolist(), time.perf_counter()
                logger.log(st.step, {"loss": means[0], "grad_norm": res.grad_norm.item(),
                                     "lr": scheduler.get_last_lr()[0], "skipped_steps": st.skipped_steps,
                                     "data_skipped": _total(st.data_skipped, accelerator),
                                     "sec_per_step": (now - t_last) / max(1, st.step - step_last)}
                           | dict(zip(res.metrics, means[1:])))
                t_last, step_last = now, st.step
                bar.set_postfix(loss=f"{means[0]:.4f}")
            if task.evaluate is not None and every(tc.eval_every):  # every process evaluates its share
                logger.log(st.step, {f"test_{k}": v for k, v in task.evaluate(st.eval_model).items()})
            if task.sample is not None and every(tc.sample_every) and is_main:
                images = task.sample(st.eval_model, torch.Generator(device).manual_seed(tc.seed))
                save_grid(images, run_dir / "samples" / f"step_{st.step:08d}.png", task.sample_nrow)
            if every(tc.ckpt_every):
                _checkpoint(st, run_dir, tc.keep_checkpoints, accelerator, lock)
            if res.stop and st.step < tc.steps:
                path = _checkpoint(st, run_dir, tc.keep_checkpoints, accelerator, lock) if st.saved_step != st.step \
                    else run_dir / "checkpoints" / f"step_{st.step:08d}"
                raise TrainingInterrupted(stop.received or signal.SIGTERM, st.step, path)
    if st.saved_step != st.step:
        _checkpoint(st, run_dir, tc.keep_checkpoints, accelerator, lock)
    if task.finish is not None and (is_main or task.finish_on_every_rank):
        task.finish(st.eval_model, run_dir)
    accelerator.wait_for_everyone()
    # The process group stays up (no end_training): callers may evaluate across processes next.
    return run_dir

