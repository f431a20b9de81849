"""Crash test of the training loop: kill -9 a real training run at random moments, resume it each time,
and check that nothing but the steps since the last checkpoint was lost and that the final weights,
optimizer state and logged losses equal an uninterrupted run's, bit for bit.

    python -m latent_ndm.experiments.crashtest --trials 10 --out runs/crashtest      (scripts/crashtest.sh)

Each run is `python -m latent_ndm.cli train` in its own process group, killed with SIGKILL (the whole
group, data workers included, as a pre-empted machine would be). After every kill it checks that the
newest complete checkpoint verifies against its manifest, and that the next start takes over the lock the
killed job left and resumes from exactly that checkpoint. A last trial starts the same command twice at once
on a fresh run directory: one start must train (bitwise the uninterrupted run), the other be refused at once.
Writes OUT/crashtest.json; exits non-zero when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from latent_ndm.training.checkpoint import checkpoint_dirs, latest_checkpoint, verify_checkpoint

TINY = [f"model.{n}.{o}" for n in ("denoiser", "transform_net")
        for o in ("channels=8", "channel_mult=[1,2]", "groups=4")]
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def _command(config: str, name: str, out: Path, shards: Path, steps: int, ckpt_every: int) -> list[str]:
    overrides = [f"name={name}", f"out_dir={out}", f"data.shards={shards}", "data.num_workers=1",
                 "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=5", f"train.steps={steps}",
                 f"train.ckpt_every={ckpt_every}", "train.keep_checkpoints=2", "train.log_every=1",
                 "train.eval_every=0", "train.sample_every=0", "eval.final_examples=32", *TINY]
    return [sys.executable, "-m", "latent_ndm.cli", "train", config, *overrides]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by the kill; the resume drops it
            pass
    return rows


def _compare(a: Path, b: Path) -> list[str]:
    """Differences between the final checkpoints and logs of two runs (empty: bitwise equal)."""
    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    problems = []
    if ca is None or cb is None or ca.name != cb.name:
        return [f"final checkpoints differ: {ca} vs {cb}"]
    for f in sorted(p.name for p in ca.glob("*.safetensors")):
        ta, tb = load_file(str(ca / f)), load_file(str(cb / f))
        problems += [f"{f}:{k}" for k in ta if not torch.equal(ta[k], tb[k])]
    sa, sb = (torch.load(c / "state.pt", weights_only=True) for c in (ca, cb))
    for (k, va), vb in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].values()):
        problems += [f"optimizer.{k}.{n}" for n in va if not torch.equal(va[n], vb[n])]
    keys = ("step", "loss", "grad_norm", "lr", "skipped_steps")
    la, lb = ([tuple(r.get(k) for k in keys) for r in _logged(d)] for d in (a, b))
    if la != lb:
        problems.append(f"logged losses differ ({len(la)} vs {len(lb)} rows)")
    return problems


def run(trials: int, steps: int, ckpt_every: int, out: Path, shards: Path | None, config: str, seed: int) -> dict:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    if shards is None:
        from latent_ndm.data.writer import make_shards

        shards = out / "mnist5k"
        if not (shards / "manifest.json").is_file():
            make_shards("mnist5k", shards, maxcount=1000)
    for name in ("reference", "crashed"):
        shutil.rmtree(out / name, ignore_errors=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)

    # The uninterrupted reference; its median step time spreads the kills over a whole step.
    ref = _start(_command(config, "reference", out, shards, steps, ckpt_every), logs / "reference.log")
    if ref.wait() != 0:
        raise RuntimeError(f"the reference run failed; see {logs / 'reference.log'}")
    per_step = sorted(r["sec_per_step"] for r in _logged(out / "reference"))[steps // 2]

    results, crashed = [], out / "crashed"
    cmd = _command(config, "crashed", out, shards, steps, ckpt_every)
    expect_resume = None
    for i in range(trials + 1):
        done = latest_checkpoint(crashed)
        # Rows logged after the checkpoint stay in metrics.jsonl until the resume drops them: aim past them.
        start = max(int(done.name.split("_")[1]) if done else 0, results[-1]["logged_step"] if results else 0)
        last = i == trials or start + 1 > steps - 2  # the final start runs to the end
        proc = _start(cmd, logs / f"crashed_{i:02d}.log")
        # Kill at a random moment of a random step: once step `target` is logged, wait up to one step time,
        # so that kills land in the forward/backward pass, the logging and the checkpoint writes alike.
        target, delay = 0, 0.0
        if not last:
            spread = max(1, 2 * (steps - 2 - start) // (trials - i))  # the kills spread over the remaining steps
            target, delay = min(steps - 2, start + rng.randint(1, spread)), rng.uniform(0.0, per_step)
        while not last and proc.poll() is None:
            rows = _logged(crashed)
            if rows and rows[-1]["step"] >= target:
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        code = proc.wait()
        text = (logs / f"crashed_{i:02d}.log").read_text()
        found = RESUMED.search(text)
        resumed_at = int(found.group(2)) if found else 0
        row = {"trial": i, "killed": code == -signal.SIGKILL, "exit": code, "kill_after_step": target or None,
               "delay_s": round(delay, 3),
               "resumed_at": resumed_at, "resume_ok": resumed_at == (expect_resume or 0)}
        if code not in (0, -signal.SIGKILL):
            row["error"] = text.strip().splitlines()[-1] if text.strip() else "no output"
        rows = _logged(crashed)
        newest = latest_checkpoint(crashed)
        row["logged_step"] = rows[-1]["step"] if rows else 0
        row["newest_checkpoint"] = int(newest.name.split("_")[1]) if newest else 0
        row["mid_write"] = any((crashed / "checkpoints").glob(".tmp_*")) if newest else False
        try:
            for ckpt in checkpoint_dirs(crashed):
                verify_checkpoint(ckpt)
            row["checkpoints_verify"] = True
        except Exception as e:  # reported, not raised: the summary counts failures
            row["checkpoints_verify"], row["error"] = False, str(e)
        row["steps_lost"] = row["logged_step"] - row["newest_checkpoint"]
        expect_resume = row["newest_checkpoint"]
        results.append(row)
        print(json.dumps(row), flush=True)
        if code == 0:
            break
    if results[-1]["exit"] != 0:  # every kill came after the run ended: finish it
        raise RuntimeError("the crashed run did not finish")
    concurrent = _concurrent_launch(_command(config, "concurrent", out, shards, steps, ckpt_every), out, logs)
    print(json.dumps(concurrent), flush=True)
    differences = _compare(out / "reference", crashed)
    kills = [r for r in results if r["killed"]]
    summary = {
        "trials": len(kills), "steps": steps, "ckpt_every": ckpt_every,
        "resumes_ok": sum(r["resume_ok"] for r in results[1:]), "resumes": len(results) - 1,
        "all_checkpoints_verify": all(r["checkpoints_verify"] for r in results),
        "max_steps_lost": max((r["steps_lost"] for r in kills), default=0),
        "killed_mid_write": sum(r["mid_write"] for r in kills),
        "bitwise_equal": not differences, "differences": differences[:10], "runs": results,
        "concurrent": concurrent,
    }
    summary["ok"] = (summary["resumes_ok"] == summary["resumes"] and summary["all_checkpoints_verify"]
                     and summary["bitwise_equal"] and summary["max_steps_lost"] <= ckpt_every
                     and all(r["exit"] in (0, -signal.SIGKILL) for r in results) and concurrent["ok"])
    (out / "crashtest.json").write_text(json.dumps(summary, indent=1))
    return summary


def _concurrent_launch(cmd: list[str], out: Path, logs: Path) -> dict:
    """Two starts of one command on one fresh run directory at once (a requeued job beside its first copy):
    one must train to the end and equal the reference bitwise, the other exit non-zero at once naming it."""
    shutil.rmtree(out / "concurrent", ignore_errors=True)
    t0 = time.monotonic()
    procs = [_start(cmd, logs / f"concurrent_{i}.log") for i in range(2)]
    seconds: list[float | None] = [None, None]
    while None in seconds:
        for i, p in enumerate(procs):
            if seconds[i] is None and p.poll() is not None:
                seconds[i] = round(time.monotonic() - t0, 2)
        time.sleep(0.01)
    exits = [p.returncode for p in procs]
    texts = [(logs / f"concurrent_{i}.log").read_text().strip() for i in range(2)]
    row: dict = {"exits": exits, "seconds": seconds}
    if sorted(exits)[0] != 0 or sorted(exits)[1] == 0:
        return row | {"ok": False, "error": "expected exactly one of the two starts to train"}
    loser = exits.index(next(e for e in exits if e != 0))
    row["refused"] = texts[loser].splitlines()[-1] if texts[loser] else "no output"
    differences = _compare(out / "reference", out / "concurrent")
    row |= {"bitwise_equal": not differences, "differences": differences[:10]}
    row["ok"] = ("in use by another training job" in row["refused"] and not differences
                 and seconds[loser] < seconds[1 - loser])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crashtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10, help="kills (each followed by a resume)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--config", default="configs/ndm_mnist.yaml")
    p.add_argument("--shards", type=Path, default=None, help="training shards (default: mnist5k, written under OUT)")
    p.add_argument("--out", type=Path, default=Path("runs/crashtest"))
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    args = p.parse_args(argv)
    s = run(args.trials, args.steps, args.ckpt_every, args.out, args.shards, args.config, args.seed)
    print(f"{s['trials']} kills, {s['resumes_ok']}/{s['resumes']} resumes from the newest checkpoint, "
          f"checkpoints verify: {s['all_checkpoints_verify']}, at most {s['max_steps_lost']} steps lost "
          f"(ckpt_every={s['ckpt_every']}), {s['killed_mid_write']} kills during a checkpoint write, "
          f"final weights/optimizer/losses bitwise equal to the uninterrupted run: {s['bitwise_equal']}")
    c = s["concurrent"]
    print(f"two starts at once on one run directory: exits {c['exits']} after {c['seconds']} s; the refused one "
          f"said: {c.get('refused', '-')}; the other equals the uninterrupted run: {c.get('bitwise_equal')}")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
