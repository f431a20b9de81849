"""Two real processes on CPU (torchrun, gloo) against one: disjoint data, equal results, resume, gathered eval."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latent_ndm.training.checkpoint import latest_checkpoint

JOB = Path(__file__).with_name("distributed_job.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Launcher-level failures (the port taken between our probe and torchrun's bind, a rendezvous timeout on a
# loaded machine) say nothing about the code under test: one retry on a fresh port. Failures inside the job
# are never retried.
LAUNCH_ERRORS = ("EADDRINUSE", "address already in use", "RendezvousTimeoutError", "RendezvousConnectionError")


def torchrun(*args: str) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0",
               str(JOB), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return
        log = proc.stdout[-3000:] + proc.stderr[-6000:]
        if attempt == 0 and any(e in log for e in LAUNCH_ERRORS):
            print(f"torchrun failed to launch, retrying on a new port:\n{log}", file=sys.stderr)
            continue
        raise AssertionError(f"torchrun exited with {proc.returncode}:\n{log}")


@pytest.mark.slow  # an end-to-end command-line run
def test_two_processes_match_one_and_resume(tmp_path: Path, mnist_shards: Path) -> None:
    # Two processes: 3 steps (checkpoint at 3), then a second launch resumes to 5.
    torchrun(str(mnist_shards), str(tmp_path), "two", "3")
    first = [json.loads((tmp_path / f"two_rank{r}.json").read_text()) for r in (0, 1)]
    torchrun(str(mnist_shards), str(tmp_path), "two", "5")
    second = [json.loads((tmp_path / f"two_rank{r}.json").read_text()) for r in (0, 1)]

    # One process, 5 steps straight, same global batch (8) and data.lanes (2).
    spec = importlib.util.spec_from_file_location("distributed_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    one = job.run(str(mnist_shards), str(tmp_path), "one", 5)

    two_steps = {int(k): v for rep in first for k, v in rep["steps"].items()}
    assert sorted(two_steps) == [0, 1, 2] and sorted(int(k) for k in second[0]["steps"]) == [3, 4]
    for step in range(5):
        r0, r1 = (first if step < 3 else second)[0]["steps"][str(step)], (first if step < 3 else second)[1]["steps"][
            str(step)]
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)  # disjoint within a step
        assert r0 + r1 == one["steps"][step]  # together: the one-process global batch, lane by lane

    # Only rank 0 wrote, and the weights after 5 steps (with a resume in between) equal the 1-process run's.
    ckpt_two, ckpt_one = latest_checkpoint(tmp_path / "two"), latest_checkpoint(tmp_path / "one")
    assert ckpt_two.name == ckpt_one.name == "step_00000005"
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_00000003", "step_00000005"]
    for name in ("model", "ema"):
        a, b = load_file(ckpt_two / f"{name}.safetensors"), load_file(ckpt_one / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]  # one row per step, logged once
    for a, b in zip(rows, ref):
        for key in ("loss", "test_bpd"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)

    # The test-set evaluation: each of the 500 test images counted exactly once over the two ranks,
    # and the same number as the one-process evaluation (noise is keyed by example, not by rank).
    ids = second[0]["eval_ids"] + second[1]["eval_ids"]
    assert sorted(ids) == list(range(500)) and len(set(second[0]["eval_ids"])) == 250
    assert second[0]["eval"]["num_images"] == second[1]["eval"]["num_images"] == one["eval"]["num_images"] == 500
    assert second[0]["eval"]["bpd"] == second[1]["eval"]["bpd"]
    assert second[0]["eval"]["bpd"] == pytest.approx(one["eval"]["bpd"], rel=1e-4)


@pytest.mark.slow  # an end-to-end command-line run
def test_two_processes_match_one_on_other_tools_shards(tmp_path: Path, webdataset_jpg_shards: Path) -> None:
    """webdataset-written JPEG shards without a manifest: both processes count them (no index yet), and the
    two-process run equals the one-process run as above."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in webdataset_jpg_shards.glob("*.tar"):
        shutil.copy(tar, shards / tar.name)
    torchrun(str(shards), str(tmp_path), "two", "3")
    assert (shards / "shard_index.json").is_file()
    spec = importlib.util.spec_from_file_location("distributed_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    one = job.run(str(shards), str(tmp_path), "one", 3)
    two = [json.loads((tmp_path / f"two_rank{r}.json").read_text()) for r in (0, 1)]
    for step in range(3):
        r0, r1 = two[0]["steps"][str(step)], two[1]["steps"][str(step)]
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
        assert r0 + r1 == one["steps"][step]
    for name in ("model", "ema"):
        a = load_file(latest_checkpoint(tmp_path / "two") / f"{name}.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "one") / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    ids = two[0]["eval_ids"] + two[1]["eval_ids"]
    assert sorted(ids) == list(range(100)) and two[0]["eval"]["bpd"] == pytest.approx(one["eval"]["bpd"], rel=1e-4)
