"""What pixel and latent models share in training: the NELBO objective and the task around it.

The objective is the whole model's bound (`ImageModel.nelbo_terms`: the codec's terms + the NDM's), per
example in nats, optimised in bits per image dimension. phi (inside F) always trains on this true
NELBO: a simplified eps-loss would let F collapse (docs/MATH.md, section 8).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from latent_ndm.config import LatentRunConfig, RunConfig
from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.model import ImageModel
from latent_ndm.core.noise import Noise
from latent_ndm.data.shards import SplitShards, dataset_version
from latent_ndm.data.streams import (
    cached_eval_examples,
    eval_examples,
    process_group,
    total_over_processes,
    train_batches,
)
from latent_ndm.evaluation.nelbo import evaluate_nelbo
from latent_ndm.sampling.samplers import ancestral
from latent_ndm.training.loop import Task


class NELBOObjective(nn.Module):
    """Per-example NELBO of a batch in nats, with each term (and the total) logged in bits/dim.

    kl_anneal_steps > 0 (LSGM's KL annealing, stage 3): the weight of log q + the prior's NELBO in the
    encoder's gradient rises linearly from kl_anneal_start to 1; the logged values are the true bound.
    Batches of stored posteriors (pre-encoded latents) have no decoder term: then 'prior_nelbo_bpd'
    (the NDM's rec + diff + prior) is logged instead of 'bpd'. A module, so that its state (the NDM
    loss's t proposal) is checkpointed with the run.
    """

    def __init__(self, loss: NDMLoss, dims: int, kl_anneal_steps: int = 0, kl_anneal_start: float = 1.0):
        super().__init__()
        self.loss = loss
        self.loss_scale = 1.0 / (dims * math.log(2))  # optimise bits/dim: nats/(D ln 2)
        self.kl_anneal_steps, self.kl_anneal_start = kl_anneal_steps, kl_anneal_start

    def kl_weight(self, step: int) -> float:
        if self.kl_anneal_steps <= 0 or step >= self.kl_anneal_steps:
            return 1.0
        return self.kl_anneal_start + (1.0 - self.kl_anneal_start) * step / self.kl_anneal_steps

    def forward(self, model: ImageModel, batch: Tensor, noise: Noise, step: int = 0
                ) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.kl_weight(step)
        terms = model.nelbo_terms(batch, noise, self.loss, kl_weight=w)
        nats = sum(terms.values())
        metrics = {f"{k}_bpd": v.detach().mean() * self.loss_scale for k, v in terms.items()}
        if "log_q" in terms and "decoder" not in terms:
            metrics["prior_nelbo_bpd"] = (nats - terms["log_q"]).detach().mean() * self.loss_scale
        else:
            metrics["bpd"] = nats.detach().mean() * self.loss_scale
        if self.kl_anneal_steps:
            metrics["kl_weight"] = torch.tensor(w, device=nats.device)
        return nats, metrics

    def end_step(self, applied: bool = True) -> None:
        """After every step, on every process: the t proposal learns from the step's losses (if applied)."""
        self.loss.update_proposal(keep=applied)

    def load_legacy_proposal(self, weights: dict[str, Tensor]) -> bool:
        """Runs saved before the loss owned the t proposal kept it in the model's weights ('time_sampler.*'
        or 'ndm.time_sampler.*'); take it from there. Returns whether one was found."""
        found = {k.rsplit("time_sampler.", 1)[1]: v for k, v in weights.items() if "time_sampler." in k}
        if self.loss.proposal is None or set(found) != {"second_moment", "seen"}:
            return False
        self.loss.proposal.load_state_dict(found)
        return True


def diffusion_task(cfg: RunConfig | LatentRunConfig, model: ImageModel, objective: NELBOObjective,
                   shards: SplitShards | None = None, param_groups=None) -> Task:
    """Training of `model` on cfg.data (or on `shards`, e.g. pre-encoded latents): periodic test NELBO on
    train.eval_examples evenly spaced test images (each process its share, read once and kept), sample
    grids from the ancestral sampler, and at the end `test_report.json` over cfg.eval.final_examples."""
    test_examples = cached_eval_examples(cfg.data, cfg.train.eval_examples)
    e = cfg.eval

    def stream(start_step: int):
        return train_batches(cfg.data, cfg.train.batch_size, cfg.train.seed, start_step, shards=shards)

    def evaluate(m: ImageModel) -> dict[str, float]:
        images, ids = test_examples()
        return evaluate_nelbo(m, images, ids, e.num_steps, e.batch_size, e.repeats, e.seed, distributed=True)

    def sample(m: ImageModel, generator: torch.Generator) -> Tensor:
        was_training = m.training
        m.eval()  # no dropout while sampling, also when there is no EMA copy
        steps = min(cfg.train.sample_steps, m.ndm.num_steps or math.inf)
        x = ancestral(m.ndm, (cfg.train.num_samples, *m.ndm.data_shape), generator, steps).x
        images = m.codec.decode(x)
        m.train(was_training)
        return images

    def finish(m: ImageModel, run_dir: Path) -> None:
        # Every process evaluates its share of the test images; the terms are gathered, rank 0 writes.
        images, ids, skipped = eval_examples(cfg.data, "test", e.final_examples)
        report = {"nelbo": evaluate_nelbo(m, images, ids, e.num_steps, e.batch_size, e.repeats, e.seed,
                                          distributed=True)}
        report["skipped_unreadable"] = total_over_processes(skipped)
        if version := dataset_version(cfg.data.shards):
            report["dataset_version"] = version
        if process_group()[0] == 0:
            (run_dir / "test_report.json").write_text(json.dumps(report, indent=2) + "\n")

    return Task(model, objective, stream, evaluate, sample, finish=finish, param_groups=param_groups,
                finish_on_every_rank=True)
