"""One optimizer step, shared by the shard-streaming loop (training/loop.py) and the 2D experiments.

`train_step` runs the objective on each micro-batch (gradient accumulation: their gradients add up to
the step's), lets the objective fold the step into its state, clips the gradient norm, and applies the
step only if the loss and the gradient are finite everywhere (a non-finite step would poison the weights
and the EMA). With an `accelerate.Accelerator` it is data parallel: gradients are synchronised once per
step, and the decisions come from one small collective, so every process takes the same ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latent_ndm.core.noise import Noise
from latent_ndm.training.ema import EMA

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant", total_steps: int = 0,
              min_factor: float = 0.0) -> float:
    """The learning rate at optimizer step `step` as a multiple of the peak: a linear warm-up over
    warmup_steps, then constant or a cosine decay to min_factor at total_steps."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule == "constant" or step < warmup_steps:
        return warm
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    loss: Tensor  # the optimised loss of the whole step (mean over micro-batches), detached
    grad_norm: Tensor  # before clipping
    metrics: dict[str, Tensor]  # the objective's metrics, means over micro-batches
    applied: bool  # False: non-finite somewhere, skipped
    stop: bool  # some process was asked to stop (`should_stop`, agreed by every process)


def train_step(model: nn.Module, micro_batches: Sequence[tuple[Tensor, Noise]], step: int, loss_scale: float,
               optimizer: torch.optim.Optimizer, scheduler, grad_clip: float = 0.0, ema: EMA | None = None,
               ema_model: nn.Module | None = None, end_step: Callable[[bool], None] | None = None,
               accelerator=None, should_stop: Callable[[], bool] | None = None) -> StepResult:
    """One step of `model(batch, noise, step) -> (per-example loss [B], metrics)` over the micro-batches.

    loss_scale multiplies the mean per-example loss into the optimised one (e.g. 1/(D ln 2) for nats ->
    bits/dim). ema follows `ema_model` (default: model). end_step(applied): called on every process once the
    step's fate is known (e.g. the t proposal learns from the step's losses, or forgets them if skipped).
    should_stop: asked after the backward passes (a signal that arrived during this step stops the run after
    it). Gradients are zeroed at the end.
    """
    n = len(micro_batches)
    loss, metrics = torch.zeros(()), {}
    for i, (batch, noise) in enumerate(micro_batches):
        # Synchronise gradients across processes once, on the last micro-batch.
        quiet = accelerator.no_sync(model) if accelerator is not None and i < n - 1 else contextlib.nullcontext()
        with quiet, accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            nats, m = model(batch, noise, step)
        part = nats.mean() * loss_scale / n if n > 1 else nats.mean() * loss_scale
        accelerator.backward(part) if accelerator is not None else part.backward()
        loss = part.detach() if i == 0 else loss + part.detach()
        metrics = m if n == 1 else {k: metrics.get(k, 0) + v.detach() / n for k, v in m.items()}
    clip = grad_clip if grad_clip > 0 else math.inf
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
    else:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
    # One small collective: is the loss non-finite anywhere (grad_norm comes from all-reduced gradients, so it
    # is the same on every process), and has any process been asked to stop?
    flags = torch.stack([~torch.isfinite(loss) | ~torch.isfinite(grad_norm),
                         torch.tensor(should_stop is not None and should_stop(), device=grad_norm.device)]).float()
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    nonfinite, stop = (v > 0 for v in flags.tolist())
    if end_step is not None:  # e.g. the t proposal learns from the step's losses, unless they were not finite
        end_step(not nonfinite)
    if not nonfinite:
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model if ema_model is None else ema_model, step)
    # Flush the gradients now: their memory is not needed until the next backward.
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, metrics, not nonfinite, stop)
