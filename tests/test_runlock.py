"""One run directory, one training job: the ownership lock, a second job refused, dead owners taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latent_ndm.training.checkpoint import latest_checkpoint
from latent_ndm.training.runlock import LOCK_NAME, RunLock, RunLockError, read_lock

NETS = [f"model.{n}.{o}" for n in ("denoiser", "transform_net")
        for o in ("channels=8", "channel_mult=[1,2]", "groups=4")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the PID no longer exists
    return proc.pid


def _write_lock(run_dir: Path, **record) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
            "token": "someone-else"}
    (run_dir / LOCK_NAME).write_text(json.dumps(base | record))


def test_a_second_lock_is_refused_naming_the_holder_and_release_frees_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = RunLock(run_dir).acquire()
    held = read_lock(run_dir / LOCK_NAME)
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["token"] == first.token
    with pytest.raises(RunLockError, match=rf"in use by another training job: PID {os.getpid()} on "
                                           rf"{socket.gethostname()}, started .* UTC, last heartbeat \d+ s ago"):
        RunLock(run_dir).acquire()
    first.release()
    assert not (run_dir / LOCK_NAME).exists() and run_dir.exists() is False  # it made the folder: it removes it
    with RunLock(run_dir) as again:
        assert read_lock(run_dir / LOCK_NAME)["token"] == again.token
    assert not (run_dir / LOCK_NAME).exists()


def _within(seconds: float, condition) -> bool:
    """Poll `condition` until it holds or `seconds` pass (a busy CI machine may delay the heartbeat thread)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_heartbeat_keeps_the_lock_fresh_and_a_taken_lock_is_noticed(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, heartbeat=0.05).acquire()
    first = read_lock(tmp_path / LOCK_NAME)["heartbeat"]
    assert _within(10, lambda: read_lock(tmp_path / LOCK_NAME).get("heartbeat", first) > first)
    lock.check()
    _write_lock(tmp_path, pid=12345, token="thief")  # another job took it over
    assert _within(10, lambda: lock.lost is not None)
    with pytest.raises(RunLockError, match="was taken by another job"):
        lock.check()
    lock.release()
    assert read_lock(tmp_path / LOCK_NAME)["token"] == "thief"  # not ours: left alone


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path: Path) -> None:
    # Same host, PID gone (a kill -9, a crash): taken over at once, whatever the heartbeat says.
    _write_lock(tmp_path / "dead", pid=_dead_pid())
    with pytest.warns(UserWarning, match=r"taking over .* no longer exists on this host"):
        lock = RunLock(tmp_path / "dead").acquire()
    assert read_lock(tmp_path / "dead" / LOCK_NAME)["token"] == lock.token
    assert [p.name for p in (tmp_path / "dead").iterdir()] == [LOCK_NAME]  # the stale file was not left behind
    lock.release()
    # Another host: only the heartbeat can tell.
    _write_lock(tmp_path / "remote", host="elsewhere-node-7", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(RunLockError, match="PID 1 on elsewhere-node-7"):
        RunLock(tmp_path / "remote", stale_after=60).acquire()
    _write_lock(tmp_path / "remote", host="elsewhere-node-7", pid=1, heartbeat=time.time() - 120)
    with pytest.warns(UserWarning, match=r"no heartbeat for 1[12]\d s"):
        RunLock(tmp_path / "remote", stale_after=60).acquire().release()
    # Same host, the PID alive (this process) and a fresh heartbeat: held.
    _write_lock(tmp_path / "live")
    with pytest.raises(RunLockError):
        RunLock(tmp_path / "live").acquire()


def _race(run_dir: Path, start, done, results) -> None:
    """One contender: take the lock at the barrier, report, and hold it until every contender has reported."""
    start.wait()
    try:
        lock = RunLock(run_dir).acquire()
    except RunLockError as e:
        results.put(f"refused: {e}")
        return
    results.put("won")
    done.wait()
    lock.release()


def test_a_job_that_loses_the_race_always_reads_a_whole_record(tmp_path: Path) -> None:
    """Processes released together onto one run directory: exactly one wins, and each loser's error names the
    winner's PID. A lock created empty and written afterwards would sometimes be read empty by a loser."""
    ctx = mp.get_context("fork")
    contenders = 4
    for trial in range(15):
        run_dir = tmp_path / f"run{trial}"
        start, done, results = ctx.Barrier(contenders), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(run_dir, start, done, results)) for _ in range(contenders)]
        for p in procs:
            p.start()
        said = [results.get(timeout=60) for _ in range(contenders)]
        done.set()
        for p in procs:
            p.join(timeout=60)
        assert said.count("won") == 1, said
        assert all(re.search(r"in use by another training job: PID \d+ on ", s) for s in said if s != "won"), said
        assert not (run_dir / LOCK_NAME).exists()  # released, and no private file left behind
        assert not run_dir.exists() or not any(run_dir.iterdir())


def _train_cmd(run_dir: Path, shards: Path, steps: int, ckpt_every: int) -> list[str]:
    return [sys.executable, "-m", "latent_ndm.cli", "train", "configs/ndm_mnist.yaml", f"name={run_dir.name}",
            f"out_dir={run_dir.parent}", "train.batch_size=16", f"data.shards={shards}", "data.num_workers=0",
            "train.log_every=1", "train.eval_every=0", "train.sample_every=0", f"train.steps={steps}",
            f"train.ckpt_every={ckpt_every}", "eval.final_examples=16", *NETS]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def _rows(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow  # three command-line training runs
def test_two_jobs_started_together_on_one_run_directory(tmp_path: Path, mnist_shards: Path) -> None:
    """Exactly one trains; the other exits non-zero within seconds naming the holder; the survivor's run is
    bitwise the run a job alone makes."""
    run_dir, steps = tmp_path / "shared" / "run", 30
    cmd = _train_cmd(run_dir, mnist_shards, steps, 10)
    logs = [(tmp_path / f"job{i}.stderr").open("w+") for i in range(2)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log) for log in logs]
    seconds: list[float | None] = [None, None]
    while None in seconds:
        for i, p in enumerate(procs):
            if seconds[i] is None and p.poll() is not None:
                seconds[i] = time.monotonic() - t0
        assert time.monotonic() - t0 < 600
        time.sleep(0.05)
    ended = []
    for p, log, sec in zip(procs, logs, seconds):
        log.seek(0)
        ended.append((p.returncode, sec, log.read()))
        log.close()
    codes = sorted(code for code, _, _ in ended)
    assert codes[0] == 0 and codes[1] != 0, [e[2][-1500:] for e in ended]
    winner, loser = (ended[0], ended[1]) if ended[0][0] == 0 else (ended[1], ended[0])
    last = loser[2].strip().splitlines()[-1]
    assert last.startswith("error: ") and "is in use by another training job: PID" in last, loser[2][-1500:]
    assert socket.gethostname() in last and "Traceback" not in loser[2]
    assert loser[1] < winner[1], (loser[1], winner[1])  # refused at start-up, while the winner still trained
    print(f"refused after {loser[1]:.1f} s; the job that trained ended after {winner[1]:.1f} s")
    assert not (run_dir / LOCK_NAME).exists()
    solo_dir = tmp_path / "solo" / "run"
    subprocess.run(_train_cmd(solo_dir, mnist_shards, steps, 10), check=True, capture_output=True, timeout=600)
    a, b = _weights(run_dir), _weights(solo_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run_dir) == _rows(solo_dir) and [s for s, _ in _rows(run_dir)] == list(range(1, steps + 1))


@pytest.mark.slow  # two command-line training runs
def test_a_lock_left_by_kill_9_is_taken_over_by_the_next_start(tmp_path: Path, mnist_shards: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = _train_cmd(run_dir, mnist_shards, 400, 5)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step_*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_lock(run_dir / LOCK_NAME)["pid"] == proc.pid  # left behind by the killed job
    steps = int(latest_checkpoint(run_dir).name.split("_")[1]) + 3  # resume, then a few steps (train.steps may change)
    again = subprocess.run(_train_cmd(run_dir, mnist_shards, steps, 5), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"from a job that is gone (PID {proc.pid} no longer exists on this host)" in again.stderr
    assert "resumed from" in again.stdout + again.stderr
    assert not (run_dir / LOCK_NAME).exists() and _rows(run_dir)[-1][0] == steps


@pytest.mark.slow  # a command-line training run with a reader beside it
def test_readers_load_verified_checkpoints_while_a_job_writes_and_prunes_them(tmp_path: Path,
                                                                              mnist_shards: Path) -> None:
    """keep_checkpoints=1 and a checkpoint every step: each new checkpoint prunes the previous one. A reader
    looping beside the job (load_run, as sample / evaluate / the pipelines do, and the weights with the state of
    one checkpoint, as stage 3's init_from does) never fails, and its steps never go back."""
    from latent_ndm.tasks.runs import load_run
    from latent_ndm.training.checkpoint import run_weights

    run_dir = tmp_path / "run"
    cmd = _train_cmd(run_dir, mnist_shards, 24, 1) + ["train.keep_checkpoints=1"]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latest_checkpoint(run_dir) is None:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.02)
    loads, steps, naive_failures = 0, [], 0
    while job.poll() is None:
        _, model = load_run(run_dir)
        path, weights, state = run_weights(run_dir, with_state=True)
        assert path.parent.name == f"step_{state['step']:08d}" and weights.keys()  # weights and state agree
        steps.append(state["step"])
        loads += 2
        try:  # what a reader without read_newest does: list, then open (for the count printed below)
            load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
        except (OSError, RuntimeError, TypeError):  # safetensors reports a vanished file as RuntimeError
            naive_failures += 1
        time.sleep(0.01)
    assert job.returncode == 0
    assert steps == sorted(steps) and len(set(steps)) >= 3, steps
    print(f"{loads} loads during training, steps {steps[0]}..{steps[-1]}; list-then-open reads that failed: "
          f"{naive_failures}")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000024"]
