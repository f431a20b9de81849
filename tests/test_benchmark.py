"""Tests for latent_ndm.experiments.benchmark that assert no timing: the bf16 guard, the report without a bf16 peak, the
FLOPs the convs benchmark counts, peak memory and the diffusers reference row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from latent_ndm.experiments import benchmark


def test_bf16_fast_matches_the_onednn_capability_on_cpu() -> None:
    assert benchmark.bf16_fast("cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # Independently, on Linux x86, from the CPU's flags: oneDNN runs bf16 in vector code from AVX-512 BW/VL/DQ
    # up (natively with avx512_bf16 or AMX); an AVX2-only CPU gets scalar fallback code.
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " avx2 " in cpuinfo.read_text():
        flags = set(cpuinfo.read_text().split())
        assert benchmark.bf16_fast("cpu") == ({"avx512bw", "avx512vl", "avx512dq"} <= flags)


def test_bf16_speed_refuses_a_cpu_without_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bf16 kernels autocast runs scalar fallback code (an hour per round): refuse before building."""
    monkeypatch.setattr(benchmark, "bf16_fast", lambda device: False)
    with pytest.raises(RuntimeError, match="no bf16 kernels"):
        benchmark.speed("configs/does_not_matter.yaml", 2, 1, 1, sw=benchmark.Switches(bf16=True))


def test_markdown_without_a_bf16_peak_says_so() -> None:
    row = {"sec_per_step": 2.0, "images_per_sec": 16.0, "params": 10, "ratio_to_baseline": 1.0,
           "gflop_per_step": 300.0, "flop_ratio_to_baseline": 1.0, "time_ratio_over_flop_ratio": 1.0,
           "achieved_gflops": 150.0, "mfu_vs_fp32_peak": 0.75}
    report = {"config": "c.yaml", "batch_size": 32, "device": "cpu", "threads": 2,
              "switches": vars(benchmark.Switches()),
              "results": {"baseline": row, "_peaks_gflops": {"fp32": 200.0}, "_peaks_gflops_max": {"fp32": 210.0}}}
    text = benchmark.markdown(report)
    assert "fp32 200 (210) GFLOP/s, bf16 not measured (no bf16 kernels)" in text
    assert "75%" in text


def test_conv_shapes_account_for_every_convolution_flop_and_conv_rate_counts_the_closed_form() -> None:
    """`convs` times each distinct convolution of a forward apart: the pairs found by the hooks, weighted by
    their counts, must carry all the convolution FLOPs flop_counter sees in that forward; and one timed
    convolution is 3 direct convolutions' worth (forward, input gradient, weight gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    from latent_ndm.nets.unet import build_unet

    net = build_unet("tiny", 1, 1, 8, zero_init_out=False)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    found = benchmark.conv_shapes(net, x, t)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t)
    conv_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]

    def direct(m: torch.nn.Conv2d, shape: tuple) -> int:  # 2 x multiply-adds of a direct convolution
        b, _, h, w = shape
        ho = (h + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        wo = (w + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
        return 2 * b * m.out_channels * ho * wo * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    assert sum(n for *_, n in found) == sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert sum(n * direct(m, shape) for m, shape, n in found) == conv_flops
    module, shape, _ = max(found, key=lambda f: direct(f[0], f[1]))
    seconds, flops = benchmark.conv_rate(module, shape, torch.float32, channels_last=False, reps=1)
    assert flops == 3 * direct(module, shape) and seconds > 0


def test_peak_memory_of_a_fresh_process_grows_with_the_batch() -> None:
    """The CPU peak is the VmHWM of a child that builds one variant: more images, more activations."""
    small, large = (benchmark.peak_memory("configs/bench_cifar_size.yaml", benchmark.BASELINE, b,
                                          benchmark.Switches(), steps=1) for b in (2, 8))
    params = 6_617_667 * 4 * 4  # fp32 weights, gradients and AdamW's two moments
    assert params < small < large < 8 * 2**30


def test_reference_row_without_diffusers_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers is no dependency: the reference row must say what to install, not fail on a bare import."""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `from diffusers import ...` raise ImportError
    with pytest.raises(ImportError, match="pip install diffusers"):
        benchmark.Step("configs/bench_cifar_size.yaml", benchmark.REFERENCE, 2, benchmark.Switches())


def test_reference_is_the_issues_unet2dmodel_in_the_baselines_place() -> None:
    """Where diffusers is installed: the issue's 6.5M-parameter UNet2DModel replaces only the denoiser's
    network (F stays the identity, so the reference step has exactly that network's parameters)."""
    pytest.importorskip("diffusers")
    step = benchmark.Step("configs/bench_cifar_size.yaml", benchmark.REFERENCE, 2, benchmark.Switches())
    assert isinstance(step.model.denoiser.net, benchmark.DiffusersUNet)
    assert step.params == sum(p.numel() for p in step.model.denoiser.net.parameters()) == 6_472_195
    z, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    assert step.model.denoiser.net(z, t).shape == z.shape
