"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (or in-process, world 1).

python tests/distributed_job.py SHARDS OUT_DIR NAME STEPS: trains the tiny NDM of the test for STEPS
steps (resuming if the run exists) and writes, per process, the sample ids of every step it trained
and its share of a full test-set evaluation to OUT_DIR/NAME_rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from latent_ndm.config import load_config
from latent_ndm.data.streams import eval_examples, process_group
from latent_ndm.evaluation.nelbo import evaluate_nelbo
from latent_ndm.tasks.pixel import pixel_task
from latent_ndm.tasks.runs import load_run
from latent_ndm.training.loop import train

TINY_NET = ["channels=8", "channel_mult=[1,2]", "groups=4", "dropout=0.0"]


def config(shards: str, out_dir: str, name: str, steps: int):
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in TINY_NET]
    return load_config("configs/ndm_mnist.yaml", [
        f"name={name}", f"out_dir={out_dir}", f"data.shards={shards}", "data.lanes=2", "data.num_workers=1",
        "train.batch_size=8", f"train.steps={steps}", "train.ckpt_every=3", "train.log_every=1",
        "train.eval_every=3", "train.eval_examples=40", "train.sample_every=0", "train.warmup_steps=1",
        "eval.final_examples=16", *nets])


def run(shards: str, out_dir: str, name: str, steps: int) -> dict:
    cfg = config(shards, out_dir, name, steps)
    task = pixel_task(cfg)
    seen: dict[int, list[int]] = {}
    make_stream = task.train_batches

    def recording(start_step: int):
        for step, batch in enumerate(make_stream(start_step), start_step):
            seen[step] = batch.ids.tolist()
            yield batch

    task.train_batches = recording
    run_dir = train(cfg, task)
    rank, world = process_group()
    # A whole-test-set evaluation, each process its share, gathered.
    images, ids, _ = eval_examples(cfg.data, "test")
    _, model = load_run(run_dir)
    result = evaluate_nelbo(model, images, ids, 0, 100, 1, 7, distributed=True)
    report = {"rank": rank, "world": world, "steps": seen, "eval_ids": ids.tolist(), "eval": result}
    (Path(out_dir) / f"{name}_rank{rank}.json").write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    from accelerate import PartialState

    PartialState().destroy_process_group()
