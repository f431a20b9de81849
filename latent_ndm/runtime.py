"""Where a command runs: the device, the processes, the float32 precision policy, and one line saying so.

Precision policy. On Ampere and later GPUs, float32 matmuls and cuDNN convolutions may run in TF32
(10-bit mantissa); cuDNN convolutions do by default. That is harmless for the denoiser, but F's
outputs enter the loss as differences F(x, t) - F(xhat, t) scaled by up to SNR/gamma' (or T/v), where
TF32 rounding does not cancel, and a reported bits/dim must not depend on the card. So:
- F's forward passes (value and dF/dt) and the NDM's bound terms run with TF32 off (`full_fp32`);
- the rest (the denoiser, the VAE) follows `allow_tf32(on)`, set once per command from `train.tf32`
  (evaluate.sh: `--no-tf32` turns it off everywhere).
Gradients through F run in the autograd engine, outside these forward passes, under the global setting.
On a CPU these flags change nothing; they are set all the same, so the policy is testable anywhere.
The flags used are `torch.set_float32_matmul_precision` and `torch.backends.cudnn.allow_tf32`, the ones
accelerate and inductor read: torch refuses to mix them with the newer `fp32_precision` flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def _set(matmul_tf32: bool, conv_tf32: bool) -> None:
    torch.set_float32_matmul_precision("high" if matmul_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = conv_tf32


def allow_tf32(on: bool) -> None:
    """TF32 for float32 matmuls and convolutions outside `full_fp32` (the denoiser, the VAE)."""
    _set(on, on)


def tf32_state() -> tuple[bool, bool]:
    """(matmul, convolution): whether float32 may run in TF32 now."""
    return torch.get_float32_matmul_precision() != "highest", bool(torch.backends.cudnn.allow_tf32)


@contextmanager
def full_fp32() -> Iterator[None]:
    """Full-precision float32 matmuls and convolutions inside (F and the bound's terms)."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    _set(False, False)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' (or None): CUDA when usable, else the CPU. Asking for CUDA where it is not usable is an
    error that says why (no GPU, or a CPU-only torch, or a driver older than this torch's CUDA)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch was built without CUDA" if torch.version.cuda is None else
               f"torch (CUDA {torch.version.cuda}) sees no usable GPU: none visible, or a driver older than "
               f"CUDA {torch.version.cuda}")
        raise ValueError(f"--device {name}: {why}; use --device cpu")
    return device


def start_processes(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun / accelerate launch (WORLD_SIZE > 1) the process group is
    started here (NCCL on GPUs, gloo on CPUs) and each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: torch.device) -> torch.device:
    """This process's device: its own GPU when several processes share a machine."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def describe(device: torch.device, world: int, bf16: bool = False) -> str:
    """'device cuda:0 (NVIDIA H100 80GB HBM3), float32 (TF32: denoiser on, F and bound off), 2 processes'."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU threads"
    denoiser = "on" if any(tf32_state()) else "off"
    dtype = "bf16 autocast (F in float32)" if bf16 else "float32"
    if device.type == "cuda":
        dtype += f" (TF32: denoiser {denoiser}, F and bound off)"
    return f"device {device} ({name}), {dtype}, {world} process{'es' * (world > 1)}"


def announce(command: str, device: torch.device, world: int, rank: int = 0, bf16: bool = False) -> None:
    """The one line every command prints at its start (rank 0 only), on stderr."""
    if rank == 0:
        print(f"{command}: {describe(device, world, bf16)}", file=sys.stderr, flush=True)


def compile_denoiser(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile the denoiser's network of an ImageModel (or anything with .ndm) in place: its state dict
    keeps its names. F is never compiled: its dF/dt runs in forward mode, which compile does not support."""
    net = model.ndm.denoiser.net
    if not hasattr(net, "compile"):
        raise ValueError(f"{type(net).__name__} cannot be compiled in place")
    net.compile(backend=backend)
