"""Checkpoints: safetensors weights plus optimizer/scheduler/RNG state, written atomically.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` that appears only once complete: it is
written under a temporary name, every file is fsynced, and then it is renamed. `manifest.json` is
written last, so a directory without one is never picked up for resuming.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MANIFEST = "manifest.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_dict_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and needs contiguous tensors: store independent copies.
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(state_dict_for_safetensors(module), str(path), metadata=metadata)


def load_weights(module: nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise RuntimeError(f"cannot read weights from {path}: {e}") from e
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def run_weights(run_dir: str | Path, ema: bool = True) -> Path:
    """The weights file of a run's latest complete checkpoint: its EMA weights unless ema=False (or absent)."""
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint under checkpoints/")
    return ckpt / ("ema.safetensors" if ema and (ckpt / "ema.safetensors").is_file() else "model.safetensors")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's saved config.json, as plain data."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    return json.loads(path.read_text())


def save_checkpoint(
    run_dir: Path,
    step: int,
    modules: dict[str, nn.Module],
    state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write `modules` as safetensors and `state` (optimizer, scheduler, RNG, step) with torch.save."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = []
    for name, module in modules.items():
        save_weights(module, tmp / f"{name}.safetensors")
        files.append(f"{name}.safetensors")
    torch.save(state, tmp / "state.pt")
    files.append("state.pt")
    for f in files:
        _fsync(tmp / f)
    manifest = {"step": step, "files": {f: (tmp / f).stat().st_size for f in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    if final.exists():  # a re-save of the same step (e.g. the final checkpoint) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Load weights into `modules` and return the saved state dict (read with weights_only=True)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    for name, size in manifest["files"].items():
        actual = (path / name).stat().st_size if (path / name).exists() else -1
        if actual != size:
            raise RuntimeError(f"checkpoint {path} is damaged: {name} has {actual} bytes, manifest says {size}")
    for name, module in modules.items():
        load_weights(module, path / f"{name}.safetensors")
    return torch.load(path / "state.pt", weights_only=True)
