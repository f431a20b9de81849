"""What keeps a long run safe: stop signals, non-finite steps, a changed data layout or config on resume."""

from __future__ import annotations

import json
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from latent_ndm.config import ConfigError, config_diff, from_dict, to_dict
from latent_ndm.training.checkpoint import checkpoint_dirs, write_atomic

# Keys that may change when a run is resumed (how long and how often, not what is trained; model.fdot and
# train.grad_accum only choose how the same derivative and the same step are computed; with dropout the
# masks of micro-batches differ from the whole batch's).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.eval_every", "train.eval_examples",
                  "train.sample_every", "train.sample_steps", "train.num_samples", "train.ckpt_every",
                  "train.keep_checkpoints", "train.max_nonfinite_steps", "train.grad_accum", "train.tf32",
                  "train.compile", "train.compile_backend", "train.channels_last", "eval.", "model.fdot")


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint at `step` and stopped; rerunning resumes it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step = signum, step
        where = f"checkpoint {checkpoint}" if checkpoint else "checkpoint"
        super().__init__(f"{signal.Signals(signum).name} received: stopped at step {step} after writing its "
                         f"{where}; run the same command again to resume")


class StopSignals:
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

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_nonfinite_streak(in_row: int, step: int, limit: int, saved_step: int, run_dir: Path) -> None:
    """Stop the run after `limit` non-finite steps in a row (each was skipped, not applied)."""
    if in_row >= limit > 0:
        kept = (f"the last checkpoint (step {saved_step}, {run_dir / 'checkpoints'}) holds finite weights"
                if saved_step >= 0 else "no checkpoint was written yet")
        raise FloatingPointError(f"{in_row} non-finite steps in a row (steps {step - in_row + 1}-{step}): training "
                                 f"stopped; {kept}. Lower train.lr, check the data, or raise "
                                 "train.max_nonfinite_steps.")


def check_lanes(saved: int | None, now: int) -> None:
    # data.lanes = 0 resolves to processes x workers: relaunching differently would change the data.
    if saved is not None and now != saved:
        raise ConfigError(f"this run was trained with {saved} data lanes but now has {now}; resume with "
                          f"data.lanes={saved}")


def check_config(run_dir: Path, cfg: Any, allow_change: bool) -> None:
    """Refuse to resume a run with a different configuration (a readable diff), unless allowed."""
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
        raise ConfigError(f"{run_dir} was started with a different configuration:\n  " + "\n  ".join(blocking)
                          + "\nUse a new run name, or pass --allow-config-change to resume anyway.")


def truncate_metrics(path: Path, step: int) -> None:
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
    back to scalar code, orders of magnitude slower than float32."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_slow_bf16(bf16: bool, device: str) -> None:
    if bf16 and not bf16_fast(device):
        # Not an error: the numerics are right, and a tiny run may want the bf16 path; a real run would look hung.
        warnings.warn("train.bf16=true, but this machine has no bf16 kernels (a CPU needs avx512_bf16 or AMX): "
                      "autocast falls back to scalar code, about 100x slower than float32 (train.bf16=false)",
                      stacklevel=3)
