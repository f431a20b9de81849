"""The benchmark's `convs` mode: the denoiser's convolutions alone against the matmul peak (an upper bound
on the MFU a training step can reach on this machine)."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from latent_ndm.config import load_config
from latent_ndm.nets.build import build_ndm
from latent_ndm.training.guards import bf16_fast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", sizes: tuple[int, ...] = (1024, 2048, 3072),
                reps: int = 4) -> float:
    """Achieved FLOP/s of square matmuls in `dtype`: the best over sizes and 3 rounds (the practical peak)."""
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
        a @ b
        for _ in range(3):
            _sync(torch.device(device))
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(torch.device(device))
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def conv_shapes(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[tuple[torch.nn.Conv2d, tuple, int]]:
    """The distinct convolutions of one forward of `net`: (module, input shape, how many times that
    module-shape pair runs), found by forward hooks; modules of equal hyper-parameters and input shape are
    counted as one."""
    seen: dict[tuple, list] = {}

    def hook(module, inputs, _output):
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
               module.groups, tuple(inputs[0].shape))
        seen.setdefault(key, [module, tuple(inputs[0].shape), 0])[2] += 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        for h in handles:
            h.remove()
    return [tuple(v) for v in seen.values()]


def conv_rate(module: torch.nn.Conv2d, shape: tuple, dtype: torch.dtype, channels_last: bool,
              reps: int = 5) -> tuple[float, int]:
    """(median seconds, FLOPs) of one convolution forward and backward (input and weight gradients) at `shape`
    in `dtype` and memory format, on CPU or wherever `module` lives."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           module.padding, groups=module.groups, bias=module.bias is not None)
    device = module.weight.device
    conv = conv.to(device, dtype).to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    with torch.no_grad():
        grad = torch.ones_like(conv(x))

    def step() -> None:
        conv(x).backward(grad)
        for leaf in (x, *conv.parameters()):  # a None .grad is written, not accumulated into
            leaf.grad = None

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), counter.get_total_flops()


def convs(config: str, batch_size: int, device: str = "cpu") -> dict:
    """FLOP/s of the denoiser's convolutions alone, forward and backward, fp32 and bf16 (where this machine
    has bf16 kernels), NCHW and channels_last, against that dtype's matmul peak measured just before: the
    convolutions are most of a step's FLOPs, so their rate bounds the step's MFU from above."""
    cfg = load_config(config, [f"train.batch_size={batch_size}"])
    torch.manual_seed(0)
    net = build_ndm(cfg.model, cfg.data.channels, cfg.data.image_size).to(device).denoiser.net
    c, s = cfg.data.channels, cfg.data.image_size
    x, t = torch.zeros(batch_size, c, s, s, device=device), torch.full((batch_size,), 0.5, device=device)
    found = conv_shapes(net, x, t)
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if bf16_fast(device) else {})
    rows, totals = [], {}
    for name, dtype in dtypes.items():
        peak = matmul_peak(dtype, device)
        for cl in (False, True):
            seconds = flops = 0.0
            for module, shape, count in found:
                sec, fl = conv_rate(module, shape, dtype, cl)
                seconds, flops = seconds + count * sec, flops + count * fl
                rows.append({"dtype": name, "channels_last": cl, "conv": f"{module.in_channels}->{module.out_channels} "
                             f"k{module.kernel_size[0]} s{module.stride[0]}", "input": list(shape), "count": count,
                             "gflops": fl / sec / 1e9, "of_peak": fl / sec / peak})
            totals[f"{name} {'channels_last' if cl else 'NCHW'}"] = {
                "seconds": seconds, "gflop": flops / 1e9, "gflops": flops / seconds / 1e9, "peak_gflops": peak / 1e9,
                "of_peak": flops / seconds / peak}
    return {"rows": rows, "totals": totals}
