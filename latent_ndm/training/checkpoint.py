"""Checkpoints: safetensors weights plus optimizer/scheduler/RNG state, written atomically.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` that appears only once complete: it is
written under a temporary name, every file is fsynced, `manifest.json` (size and sha256 of every
file) is written last, and then the directory is renamed into place. A process killed at any
moment leaves either the old set of checkpoints or the new one, plus at most a hidden `.tmp_*`
directory that is never picked up and is cleared by the next save. A write that fails (a full disk)
removes its partial directory and raises `CheckpointWriteError`, naming the intact previous one.
Loading checks every file against the manifest, so a truncated or altered file is a clear error
rather than a model with garbage weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

MANIFEST = "manifest.json"
FORMAT = 2  # 1: the manifest held only file sizes


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used: missing, truncated, corrupt, or not this model's."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. no space left); the checkpoints written before are intact."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # also works on directories, which makes a rename durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace `path` by `data` all at once: readers (and a resume after kill -9) see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}_{os.getpid()}")
    try:
        _write_durably(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def state_dict_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and needs contiguous tensors: store independent copies.
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    write_atomic(path, safetensors_bytes(state_dict_for_safetensors(module), metadata=metadata))


def load_weights(module: nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read weights from {path}: {e}") from e
    load_state(module, state, path)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict read from `path` (named in the errors)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path} does not fit the model: {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


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


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint `path` after checking every file's size and sha256 against it."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST}: {e}") from e
    for name, expect in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        _check_file(path, name, expect, f.stat().st_size, lambda f=f: sha256_file(f))
    return manifest


def _check_file(ckpt: Path, name: str, expect: Any, size: int, sha256: Callable[[], str]) -> None:
    """One file of a checkpoint against its manifest entry (its size, then its sha256)."""
    expect = expect if isinstance(expect, dict) else {"bytes": expect}  # format 1
    if size != expect["bytes"]:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} has {size} bytes, the manifest says "
                              f"{expect['bytes']} (truncated?)")
    if "sha256" in expect and sha256() != expect["sha256"]:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: the contents of {name} differ from what was "
                              "written (sha256 mismatch)")


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies. Damaged ones are reported and passed over; if there are
    checkpoints but none verifies, that is an error rather than a silent restart from step 0."""
    dirs = checkpoint_dirs(run_dir)
    problems = []
    for ckpt in reversed(dirs):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"{e}; resuming from an earlier checkpoint", stacklevel=2)
            continue
        return ckpt
    if problems:
        raise CheckpointError(f"no usable checkpoint in {run_dir}:\n  " + "\n  ".join(problems)
                              + "\nMove the checkpoints/ directory away to start the run afresh.")
    return None


def read_newest(run_dir: str | Path, pick: Callable[[dict[str, Any]], list[str]],
                attempts: int = 20) -> tuple[Path, dict[str, bytes]]:
    """The bytes of the files `pick(manifest files)` names, from a run's newest complete checkpoint, each checked
    against the manifest (size and sha256). Safe while a job trains in the run: a checkpoint it prunes between
    listing and reading (pruning renames it away first) is passed over for the newer one, so a reader never sees
    a half-pruned checkpoint, and files held in memory cannot change under it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist (expected a run directory)")
    for _ in range(attempts):
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint under checkpoints/")
        try:
            files = json.loads((ckpt / MANIFEST).read_bytes())["files"]
            data = {name: (ckpt / name).read_bytes() for name in pick(files)}
        except FileNotFoundError:
            if ckpt.exists():  # still there, yet a file is missing: damaged, not pruned
                verify_checkpoint(ckpt)
                raise
            continue  # pruned while being read: the job has written a newer one
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt} has no readable {MANIFEST}: {e}") from e
        for name, blob in data.items():
            _check_file(ckpt, name, files[name], len(blob), lambda blob=blob: hashlib.sha256(blob).hexdigest())
        return ckpt, data
    raise CheckpointError(f"{run_dir}: its newest checkpoint was pruned {attempts} times while being read")


def weights_name(files: dict[str, Any], ema: bool = True) -> str:
    """The weights a checkpoint's reader wants: the EMA's when there is one (and ema=True), else the model's."""
    return "ema.safetensors" if ema and "ema.safetensors" in files else "model.safetensors"


def run_weights(run_dir: str | Path, ema: bool = True,
                with_state: bool = False) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any] | None]:
    """(weights file, weights, training state or None) of a run's newest complete checkpoint, verified: its EMA
    weights unless ema=False; with_state=True adds the training state (state.pt: step, optimizer, objective,
    ...) of the same checkpoint."""
    ckpt, data = read_newest(run_dir, lambda files: [weights_name(files, ema)] + ["state.pt"] * with_state)
    name = next(n for n in data if n.endswith(".safetensors"))
    try:
        weights = safetensors_load(data[name])
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read weights from {ckpt / name}: {e}") from e
    state = None
    if with_state:
        try:
            state = torch.load(io.BytesIO(data["state.pt"]), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {ckpt / 'state.pt'}: {e}") from e
    return ckpt / name, weights, state


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's saved config.json, as plain data."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist (expected a run directory)")
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _nonfinite(tree: Any, where: str) -> str | None:
    """The name of the first floating-point tensor in `tree` with a NaN or infinity, if any."""
    if isinstance(tree, torch.Tensor):
        return where if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        if (bad := _nonfinite(v, f"{where}.{k}" if where else str(k))) is not None:
            return bad
    return None


def _discard(path: Path) -> None:
    """Remove a directory by first renaming it out of sight, so a kill mid-way leaves no half-deleted checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    modules: dict[str, nn.Module],
    state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write `modules` as safetensors and `state` (optimizer, scheduler, RNG, step) with torch.save.

    Refuses (FloatingPointError) to write non-finite weights or optimizer state, so the last good
    checkpoint is never replaced by a poisoned one."""
    bad = _nonfinite({name: m.state_dict() for name, m in modules.items()}, "") or _nonfinite(state, "state")
    if bad is not None:
        raise FloatingPointError(f"refusing to write the checkpoint of step {step}: {bad} is not finite")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(".tmp_*"), *root.glob(".trash_*")]:  # from processes that were killed
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    try:
        tmp.mkdir()
        files = {}
        for name, module in modules.items():
            _write_durably(tmp / f"{name}.safetensors", safetensors_bytes(state_dict_for_safetensors(module)))
            files[f"{name}.safetensors"] = None
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        files["state.pt"] = None
        # Hashes of the bytes as they lie on disk (read back), so verification compares like with like.
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
        _write_durably(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1).encode())
        _fsync(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = (f"the previous checkpoint {previous} is intact and a rerun resumes from it" if previous
                else "there is no earlier checkpoint of this run")
        raise CheckpointWriteError(e.errno, f"could not write the checkpoint of step {step} under {root} "
                                   f"({e.strerror or e}); nothing was replaced: {kept}") from e
    if final.exists():  # a re-save of the same step (e.g. the final checkpoint) replaces it
        _discard(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        _discard(old)
    return final


def load_checkpoint(path: Path, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Load weights into `modules` and return the saved state dict (read with weights_only=True)."""
    path = Path(path)
    verify_checkpoint(path)
    for name, module in modules.items():
        load_weights(module, path / f"{name}.safetensors")
    try:
        # On the CPU: the optimizer moves its state to its parameters' device when it loads it.
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the offending global; keep it in the message
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {e}") from e
