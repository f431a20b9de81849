"""Everything a run carries from step to step, saved and restored as one unit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from latent_ndm.training.checkpoint import load_checkpoint, save_checkpoint
from latent_ndm.training.ema import EMA


@dataclass
class TrainState:
    """The model, its EMA, the optimizer and LR scheduler, the objective's own state (e.g. a t proposal)
    and the counters. Nothing random is carried: data order and noise are keyed by step."""

    model: nn.Module
    ema: EMA | None
    optimizer: Any
    scheduler: Any
    objective: Any = None  # anything with state_dict/load_state_dict, or None
    step: int = 0
    skipped_steps: int = 0  # non-finite steps, skipped (over the whole run)
    skipped_in_row: int = 0
    data_skipped: int = 0  # unreadable samples this process skipped since the start or resume (rank 0: the total)
    data_lanes: int | None = None  # data lanes of the run, fixed at its first step
    saved_step: int = -1  # the step of the newest checkpoint (not saved: it is the checkpoint's own step)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model} | ({"ema": self.ema.model} if self.ema is not None else {})

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def save(self, run_dir: Path, keep: int, data_skipped_total: int) -> Path:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "skipped_steps": self.skipped_steps, "data_skipped": data_skipped_total, "data_lanes": self.data_lanes}
        if self.objective is not None:
            state["objective"] = self.objective.state_dict()
        return save_checkpoint(run_dir, self.step, self.modules, state, keep=keep)

    def load(self, ckpt: Path, is_main: bool) -> None:
        state = load_checkpoint(ckpt, self.modules)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.objective is not None and "objective" in state:
            self.objective.load_state_dict(state["objective"])
        elif hasattr(self.objective, "load_legacy_proposal"):  # a checkpoint from before the loss held it
            self.objective.load_legacy_proposal(load_file(str(Path(ckpt) / "model.safetensors")))
        self.step = self.saved_step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        # The saved count is the total over processes: rank 0 carries it on.
        self.data_skipped = state.get("data_skipped", 0) if is_main else 0
        self.data_lanes = state.get("data_lanes")
