"""The compute-matched comparison (scripts/reproduce.sh compute): budgets from measured cost ratios, the wide
baseline's width, and a whole tiny run on 8x8 digits whose figures are checked against the runs it trained."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from latent_ndm.experiments import compute_matched as cm


def test_budgets_divide_the_baselines_steps_by_each_cost_ratio() -> None:
    costs = {"models": {"baseline": {"time_ratio": 1.0, "flop_ratio": 1.0},
                        "NDM": {"time_ratio": 6.1, "flop_ratio": 5.9},
                        "tiny": {"time_ratio": 5000.0, "flop_ratio": 0.5}}}
    steps = cm.budget_steps(1500, costs)
    assert steps["baseline"] == {"wall-clock": 1500, "FLOPs": 1500}
    assert steps["NDM"] == {"wall-clock": 246, "FLOPs": 254}  # round(1500 / 6.1), round(1500 / 5.9)
    assert steps["tiny"] == {"wall-clock": 1, "FLOPs": 3000}  # at least one step
    assert cm.parse_steps("digits=40") == {"mnist5k": cm.DEFAULT_STEPS["mnist5k"], "digits": 40}
    with pytest.raises(argparse.ArgumentTypeError, match="DATASET=STEPS"):
        cm.parse_steps("cifar=10")


def test_the_wide_baseline_is_the_width_nearest_ndms_parameters() -> None:
    channels, params, target = cm.wide_channels("configs/ndm_digits.yaml")
    assert target == cm._params("configs/ndm_digits.yaml", [*cm.COMMON, *cm.MODELS["NDM"]])
    assert channels % 8 == 0 and channels > 16  # the "mnist" preset: 16 channels, 8 groups
    for other in (channels - 8, channels + 8):  # the neighbouring widths are further from NDM's count
        n = cm._params("configs/ndm_digits.yaml", [*cm.COMMON, "model.transform=identity",
                                                   f"model.denoiser.channels={other}"])
        assert abs(n - target) > abs(params - target)


@pytest.mark.slow  # trains four tiny models twice (two budgets) in subprocesses
def test_a_tiny_compute_matched_run(tmp_path: Path) -> None:
    out, report = tmp_path / "runs", tmp_path / "report"
    argv = ["--datasets", "digits", "--seeds", "0", "--models", "NDM separable", "--baseline-steps", "digits=6",
            "--ode-images", "2", "--equal-steps", "digits",
            "--repeats", "2", "--cost-rounds", "1", "--cost-steps", "1", "--curve-points", "2",
            "--data", str(tmp_path / "data"), "--out", str(out), "--report", str(report)]
    assert cm.main(argv) == 0
    costs = json.loads((out / "digits" / "costs.json").read_text())
    result = json.loads((report / "compute.json").read_text())["digits"]
    budgets = cm.budget_steps(6, costs)
    assert result["steps"] == {m: b | {"steps": 6} for m, b in budgets.items()}  # --equal-steps: the baseline's 6
    assert set(costs["models"]) == set(cm.MODELS)
    assert list(result["summary"]["FLOPs"]) == ["baseline", "NDM separable"]  # the subset, and the baseline
    for model in ("baseline", "NDM separable"):
        budgets = result["steps"][model]
        run = out / "digits" / cm.run_name(model, 0)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows if "loss" in r) == max(budgets.values())  # trained to the larger budget
        for budget, n in budgets.items():
            ev = json.loads((run / f"compute_eval_step{n}.json").read_text())
            summary = result["summary"][budget][model]
            assert summary["steps"] == n and summary["nelbo"] == [ev["nelbo"]["bpd"]]
            assert len(ev["nelbo"]["per_image_bpd"]) == 360 and len(ev["ode_nll"]["per_image_bpd"]) == 2
            base = json.loads((out / "digits" / cm.run_name("baseline", 0) / "compute_eval_step6.json").read_text())
            # Paired over the same images: the difference of means.
            assert summary["delta_nelbo"][0] == pytest.approx(ev["nelbo"]["bpd"] - base["nelbo"]["bpd"], abs=1e-9)
            assert summary["delta_ode_nll"][0] == pytest.approx(ev["ode_nll"]["bpd"] - base["ode_nll"]["bpd"],
                                                                abs=1e-9)
    # The cached figure is the model's NELBO: recomputed independently through the pipeline.
    from latent_ndm.data.streams import eval_examples
    from latent_ndm.pipeline import NDMPipeline

    pipe = NDMPipeline.from_pretrained(out / "digits" / cm.run_name("NDM separable", 0))
    n = max(result["steps"]["NDM separable"].values())  # the newest checkpoint, which the pipeline loads
    images, ids, _ = eval_examples(pipe.config.data, "test", None, 0, 1)
    again = pipe.nelbo_bpd(images, num_steps=0, repeats=2, seed=pipe.config.eval.seed, ids=ids)
    cached = json.loads((out / "digits" / cm.run_name("NDM separable", 0) / f"compute_eval_step{n}.json").read_text())
    assert again["bpd"] == pytest.approx(cached["nelbo"]["bpd"], rel=1e-9)
    text = (report / "compute.md").read_text()
    assert "### Equal wall-clock" in text and "### Equal FLOPs" in text and "### Equal steps" in text
    assert "| identity (the data, x) | 1 |" in text and "What F does (equal steps, seed 0)" in text
    from PIL import Image

    for png in ("bpd_vs_flops.png", "bpd_vs_seconds.png"):
        assert Image.open(report / png).size == (660, 440)  # 6 x 4 inches at 110 dpi
    for png in ("transform_digits.png", "transform_diff_digits.png"):  # 8 classes x 5 times of 8x8 images, pad 2
        assert Image.open(report / png).size == (5 * 10 + 2, 8 * 10 + 2)
