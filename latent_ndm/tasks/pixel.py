"""Putting config, data, model and loop together for a pixel-space run; loading trained runs."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from latent_ndm.config import RunConfig, from_dict
from latent_ndm.core.codec import PixelCodec
from latent_ndm.core.ndm import NDM, build_ndm
from latent_ndm.core.noise import Noise
from latent_ndm.data.streams import cached_eval_examples, train_batches
from latent_ndm.evaluation.nelbo import evaluate_nelbo
from latent_ndm.sampling.samplers import ancestral
from latent_ndm.training.checkpoint import load_weights, read_run_config, run_weights
from latent_ndm.training.loop import Task


class NELBOObjective:
    """The NDM's NELBO on a batch of uint8 images: per-example nats, and each term in bits/dim.

    phi (inside F) always trains on this true NELBO: a simplified eps-loss would let F collapse.
    """

    def __init__(self, codec: PixelCodec, dims: int):
        self.codec, self.dims = codec, dims
        self.loss_scale = 1.0 / (dims * math.log(2))  # optimise bits/dim: nats/(D ln 2)

    def __call__(self, model: nn.Module, images: Tensor, noise: Noise, step: int = 0
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = model(self.codec.encode(images), noise)  # NDM.forward = NDM.nelbo
        nats = terms["rec"] + terms["diff"] + terms["prior"]
        metrics = {f"{k}_bpd": v.detach().mean() * self.loss_scale for k, v in terms.items()}
        return nats, metrics | {"bpd": nats.detach().mean() * self.loss_scale}


def build_model(cfg: RunConfig) -> NDM:
    return build_ndm(cfg.model, cfg.data.channels, cfg.data.image_size)


def pixel_task(cfg: RunConfig) -> Task:
    """The pixel-space NDM (or its F = identity baseline) on the shards of cfg.data.

    The periodic evaluation uses train.eval_examples evenly spaced test images, each process its
    share (read once, kept in memory), gathered so that each image counts once.
    """
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    codec = PixelCodec()
    model = build_model(cfg)
    shape = (cfg.train.num_samples, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    test_examples = cached_eval_examples(cfg.data, cfg.train.eval_examples)

    def stream(start_step: int):
        return train_batches(cfg.data, cfg.train.batch_size, cfg.train.seed, start_step)

    def evaluate(m: NDM) -> dict[str, float]:
        images, ids = test_examples()
        return evaluate_nelbo(m, images, codec, cfg.eval.num_steps, cfg.eval.batch_size, cfg.eval.repeats,
                              cfg.eval.seed, ids=ids, distributed=True)

    def sample(m: NDM, generator: torch.Generator) -> Tensor:
        was_training = m.training
        m.eval()  # no dropout while sampling, also when there is no EMA copy
        images = codec.decode(ancestral(m, shape, generator, min(cfg.train.sample_steps, m.num_steps or math.inf)).x)
        m.train(was_training)
        return images

    return Task(model, NELBOObjective(codec, math.prod(shape[1:])), stream, evaluate, sample)


def load_run(run_dir: str | Path, ema: bool = True) -> tuple[RunConfig, NDM]:
    """The config and model of a run directory, from its latest checkpoint (EMA weights by default)."""
    cfg = from_dict(RunConfig, read_run_config(run_dir))
    weights = run_weights(run_dir, ema)
    model = build_model(cfg)
    load_weights(model, weights)
    return cfg, model.eval()
