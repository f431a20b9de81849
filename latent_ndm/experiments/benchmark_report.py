"""The benchmark's reports: markdown tables beside the JSON, written together."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def markdown(report: dict) -> str:
    """The speed report as markdown tables."""
    res, peaks = report["results"], report["results"]["_peaks_gflops"]
    top = res.get("_peaks_gflops_max", peaks)
    sw = report["switches"]
    ref = "bf16" if sw["bf16"] else "fp32"
    lines = [f"config `{report['config']}`, batch {report['batch_size']}, {report['device']}, "
             f"{report['threads']} threads, switches {sw}, glibc keeps freed memory: "
             f"{report.get('keep_freed_memory', False)} (mmap threshold {report.get('mmap_threshold', 0)}); "
             "matmul peak measured in this run (median; max): "
             f"fp32 {peaks['fp32']:.0f} ({top['fp32']:.0f}) GFLOP/s, bf16 "
             + (f"{peaks['bf16']:.0f} ({top['bf16']:.0f}) GFLOP/s" if "bf16" in peaks
                else "not measured (no bf16 kernels)")
             + f". MFU: median over steps of achieved FLOP/s over the {ref} peak measured just before "
             "that variant's steps in the same round.", "",
             "| variant | s/step | images/s | time ratio | FLOP ratio | time/FLOP ratio | GFLOP/step | GFLOP/s "
             f"| MFU ({ref} peak) | peak memory GiB | params |", "|" + " --- |" * 11]
    for name, r in res.items():
        if name.startswith("_"):
            continue
        mem = r.get("peak_memory_gib")
        lines.append(f"| {name} | {r['sec_per_step']:.3f} | {r['images_per_sec']:.1f} | {r['ratio_to_baseline']:.2f} "
                     f"| {r['flop_ratio_to_baseline']:.2f} | {r['time_ratio_over_flop_ratio']:.2f} "
                     f"| {r['gflop_per_step']:.1f} | {r['achieved_gflops']:.1f} | {100 * r[f'mfu_vs_{ref}_peak']:.0f}% "
                     f"| {'-' if mem is None else f'{mem:.2f}'} | {r['params']:,} |")
    if report.get("sampling"):
        lines += ["", f"Sampling, batch {report['sample_batch']}, {report['sample_nfe']} network evaluations "
                  "per sample (Heun: NFE/2 steps; RK45 adaptive):", "",
                  "| model: sampler | images/s | NFE xhat | NFE F | seconds |", "| --- | --- | --- | --- | --- |"]
        for name, r in report["sampling"].items():
            lines.append(f"| {name} | {r['images_per_sec']:.1f} | {r['nfe_xhat']} | {r['nfe_f']} "
                         f"| {r['seconds']:.2f} |")
    return "\n".join(lines)


def convs_markdown(result: dict, config: str, batch_size: int, device: str) -> str:
    """The convs report as markdown: totals per dtype and layout, then every distinct convolution."""
    lines = [f"config `{config}`, batch {batch_size}, {device}, {torch.get_num_threads()} threads: the denoiser's "
             "convolutions alone, forward and backward (input and weight gradients), each timed apart (median "
             "of 5)", "", "| dtype, layout | seconds per step (all convs, fwd+bwd) | GFLOP | GFLOP/s "
             "| matmul peak GFLOP/s | of peak |", "|" + " --- |" * 6]
    lines += [f"| {k} | {r['seconds']:.3f} | {r['gflop']:.1f} | {r['gflops']:.0f} | {r['peak_gflops']:.0f} "
              f"| {100 * r['of_peak']:.0f}% |" for k, r in result["totals"].items()]
    lines += ["", "| dtype | channels_last | conv | input | count | GFLOP/s | of peak |", "|" + " --- |" * 7]
    lines += [f"| {r['dtype']} | {r['channels_last']} | {r['conv']} | {r['input']} | {r['count']} "
              f"| {r['gflops']:.0f} | {100 * r['of_peak']:.0f}% |" for r in result["rows"]]
    return "\n".join(lines)


def write_report(out: Path | None, report: dict, text: str) -> None:
    """OUT.json and OUT.md, when --out is given."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text + "\n")
