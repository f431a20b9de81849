"""Reading shards for training and evaluation, on one process or many.

Training: the global batch of every step is drawn from `lanes` independent, infinite, shuffled
streams over the train shards (each lane: shards in a fresh random order every epoch, each shard
read whole and its samples permuted). Lane l contributes `batch_size / lanes` consecutive samples
of its stream to every step; process r of W holds lanes r, r + W, ..., and its decoding workers
split those lanes between them. Everything random is keyed by (seed, lane, epoch, shard), so:
- processes see disjoint samples within a step, and every process gets one batch per step
  forever (no uneven ends that would hang data parallelism);
- with a fixed `data.lanes`, 1, 2 or 8 processes see the same global batches;
- resuming at step k skips whole shards by their manifest counts: the stream continues exactly,
  also over unreadable samples (every step covers fixed stream positions; an unreadable sample's
  place is taken by another sample of the same step and lane).

Evaluation: one deterministic pass in which each test example belongs to exactly one process
(whole shards per process when there are enough, otherwise every W-th example).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latent_ndm.config import ConfigError, DataConfig
from latent_ndm.core.noise import Noise, keyed_generator
from latent_ndm.data.images import Conversion
from latent_ndm.data.shards import (
    ForeignFormat,
    ReadStats,
    ShardFormatError,
    SplitShards,
    decode_or_skip,
    foreign_split,
    has_manifest,
    iterate_split,
    shard_samples,
    split_shards,
)


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def total_over_processes(n: int) -> int:
    """The sum of a count over all processes (n itself when not distributed)."""
    rank, world = process_group()
    if world == 1:
        return n
    parts: list = [None] * world
    dist.all_gather_object(parts, n)
    return sum(parts)


def open_split(cfg: DataConfig, split: str) -> SplitShards:
    """The shards of a split: the project's (checked against the configured image shape), or, in a
    folder without a manifest, another tool's (converted to the configured shape on reading)."""
    if not has_manifest(cfg.shards) and Path(cfg.shards).is_dir():
        keys = tuple(k.strip().lower() for k in cfg.image_keys.split(",") if k.strip())
        foreign = ForeignFormat(keys, cfg.label_key, Conversion(channels=cfg.channels, resize=cfg.image_size))
        return foreign_split(cfg.shards, split, cfg.train_urls, cfg.test_urls, foreign, cfg.channels, cfg.image_size)
    shards = split_shards(cfg.shards, split, cfg.train_urls if split == "train" else cfg.test_urls)
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if shards.shape != want:
        raise ValueError(f"{cfg.shards} holds {'x'.join(map(str, shards.shape))} (C x H x W) images but the config "
                         f"says data.channels={cfg.channels}, data.image_size={cfg.image_size}")
    return shards


@dataclass
class Batch:
    """One process's part of a global training batch: its lanes' chunks, in lane order."""

    images: Tensor  # uint8 [B / W, C, H, W]; or float32 [B / W, 2c, h, w] posterior parameters (latent shards)
    ids: Tensor  # int64 [B / W]: each image's index in the train split
    lanes: list[int]
    chunk: int  # samples per lane per step
    num_lanes: int
    skipped: int  # unreadable samples / damaged shards skipped while assembling this batch

    def split(self, k: int) -> list[Batch]:
        """k micro-batches of whole lanes (gradient accumulation). Each keeps its lanes' keyed noise and their
        places in the global batch, so the k parts draw exactly the noise of the whole batch."""
        if len(self.lanes) % k:
            raise ConfigError(f"train.grad_accum={k} must divide the {len(self.lanes)} data lanes of this process: "
                              f"set data.lanes to a multiple of {k} x the number of processes")
        n = len(self.lanes) // k
        return [Batch(self.images[i * n * self.chunk : (i + 1) * n * self.chunk],
                      self.ids[i * n * self.chunk : (i + 1) * n * self.chunk], self.lanes[i * n : (i + 1) * n],
                      self.chunk, self.num_lanes, self.skipped if i == 0 else 0) for i in range(k)]

    def noise(self, seed: int, step: int, device: torch.device) -> Noise:
        """The step's noise for these examples, keyed by (seed, step, lane): the same whichever process
        holds a lane, with t stratified over the global batch."""
        gens = [keyed_generator(device, seed, "train-noise", step, lane) for lane in self.lanes]
        positions = torch.cat([torch.arange(lane * self.chunk, (lane + 1) * self.chunk) for lane in self.lanes])
        return Noise(gens, [self.chunk] * len(self.lanes), keyed_generator(device, seed, "train-t", step),
                     positions.to(device), self.chunk * self.num_lanes)


class LaneStream(IterableDataset):
    """Chunks of the given lanes for steps start_step, start_step + 1, ...; split among DataLoader workers."""

    def __init__(self, shards: SplitShards, lanes: list[int], chunk: int, seed: int, start_step: int,
                 hflip: bool = False, strict: bool = False):
        self.shards, self.lanes, self.chunk, self.seed = shards, lanes, chunk, seed
        self.start_step, self.hflip, self.strict = start_step, hflip, strict

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.lanes if info is None else self.lanes[info.id :: info.num_workers]
        streams = [self._chunks(lane) for lane in mine]
        for step in itertools.count(self.start_step):
            for lane, stream in zip(mine, streams):
                images, ids, skipped = next(stream)
                # A dict, so that DataLoader's pin_memory reaches the tensors.
                yield {"step": step, "lane": lane, "images": images, "ids": ids, "skipped": skipped}

    def _chunks(self, lane: int) -> Iterator[tuple[Tensor, Tensor, int]]:
        """Each step's `chunk` stream positions of the lane. A position whose sample is unreadable takes
        the next readable sample of the same chunk (cyclically) or, when the chunk has none, the lane's
        latest readable one: steps always cover the same positions, so resuming stays exact on bad data."""
        stats = ReadStats(self.strict)
        slots = self._slots(lane, stats)
        spare: tuple[Tensor, int] | None = None
        while True:
            before = stats.skipped
            items = [next(slots) for _ in range(self.chunk)]
            good = [item for item in items if item[0] is not None]
            while not good and spare is None:  # only a lane's very first chunk can get here: read on
                item = next(slots)
                good = [item] if item[0] is not None else []
            spare = good[-1] if good else spare
            filled = [item if item[0] is not None else
                      next((x for x in items[k + 1 :] + items[:k] if x[0] is not None), spare)
                      for k, item in enumerate(items)]
            yield torch.stack([x for x, _ in filled]), torch.tensor([i for _, i in filled]), stats.skipped - before

    def _slots(self, lane: int, stats: ReadStats) -> Iterator[tuple[Tensor | None, int]]:
        """Lane `lane`'s infinite stream of (image, id) by position, starting where start_step leaves it;
        an unreadable sample gives (None, id)."""
        shards, total = self.shards, self.shards.count
        epoch, skip = divmod(self.start_step * self.chunk, total)
        while True:
            good, whole_epoch = 0, skip == 0
            g = keyed_generator("cpu", self.seed, "shards", lane, epoch)
            shard_order = torch.randperm(len(shards.urls), generator=g)
            for j in shard_order.tolist():
                count = shards.counts[j]
                if skip >= count:  # consumed before the resumed step: not even opened
                    skip -= count
                    continue
                samples = list(shard_samples(shards.urls[j], stats))  # whole shard (encoded bytes) in memory
                if len(samples) > count:
                    raise ShardFormatError(f"{shards.urls[j]} holds {len(samples)} samples but its manifest or "
                                           f"index says {count}: the shard was replaced; make or index it again")
                stats.skipped += count - len(samples)  # a damaged shard: its missing samples count as skipped
                # Permutations over the recorded count, so positions stay where they were in an intact shard.
                g = keyed_generator("cpu", self.seed, "samples", lane, epoch, j)
                order, flips = torch.randperm(count, generator=g), torch.rand(count, generator=g) < 0.5
                for p in order[skip:].tolist():
                    item = decode_or_skip(samples[p], shards, stats) if p < len(samples) else None
                    if item is None:
                        yield None, shards.offsets[j] + p
                        continue
                    good += 1
                    yield (item[0].flip(-1) if self.hflip and flips[p] else item[0]), shards.offsets[j] + p
                skip = 0
            if good == 0 and whole_epoch:  # without this check, a stream of only bad data would spin forever
                raise RuntimeError(f"a whole pass over the {len(shards.urls)} train shards gave no readable sample "
                                   f"({stats.skipped} skipped; first: {stats.messages[:1]})")
            epoch += 1


def lane_layout(cfg: DataConfig, batch_size: int, world: int) -> tuple[int, int]:
    """(number of lanes, samples per lane per step), with clear errors for layouts that do not divide."""
    lanes = cfg.lanes or world * max(1, cfg.num_workers)
    name = f"data.lanes={lanes}" if cfg.lanes else f"data.lanes=0 (= {world} processes x {cfg.num_workers} workers)"
    if lanes % world:
        raise ValueError(f"{name} must be a multiple of the {world} processes")
    if batch_size % lanes:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of {name} "
                         f"(the global batch is drawn equally from every lane)")
    return lanes, batch_size // lanes


def train_batches(cfg: DataConfig, batch_size: int, seed: int, start_step: int = 0,
                  rank: int | None = None, world: int | None = None,
                  shards: SplitShards | None = None) -> Iterator[Batch]:
    """This process's part of the global batch of steps start_step, start_step + 1, ... (forever).

    batch_size is global; rank and world default to the current process group. shards: the split to
    stream (default: cfg's train images; e.g. pre-encoded latents, latent_ndm.data.latent_shards).
    """
    if rank is None or world is None:
        rank, world = process_group()
    num_lanes, chunk = lane_layout(cfg, batch_size, world)
    mine = list(range(rank, num_lanes, world))
    # Workers must hold equal numbers of lanes: DataLoader takes items round-robin, so unequal
    # workers would drift apart in steps and the reassembly buffer would grow without bound.
    workers = max(d for d in range(1, len(mine) + 1) if len(mine) % d == 0 and d <= max(1, cfg.num_workers))
    workers = 0 if cfg.num_workers == 0 else workers
    if 0 < workers < cfg.num_workers:
        warnings.warn(f"using {workers} of data.num_workers={cfg.num_workers} decoding workers: this process holds "
                      f"{len(mine)} lanes and workers must share them equally (raise data.lanes)", stacklevel=2)
    shards = open_split(cfg, "train") if shards is None else shards
    dataset = LaneStream(shards, mine, chunk, seed, start_step, cfg.hflip, cfg.strict)
    source = iter(DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                             prefetch_factor=cfg.prefetch if workers else None))
    pending: dict[tuple[int, int], dict] = {}
    for step in itertools.count(start_step):
        while any((step, lane) not in pending for lane in mine):
            item = next(source)
            pending[(item["step"], item["lane"])] = item
        parts = [pending.pop((step, lane)) for lane in mine]
        yield Batch(torch.cat([p["images"] for p in parts]), torch.cat([p["ids"] for p in parts]), mine, chunk,
                    num_lanes, sum(p["skipped"] for p in parts))


def share_of_split(num_shards: int, rank: int, world: int) -> tuple[Callable[[int], bool], Callable[[int], bool]]:
    """(keep_shard(j), keep(id)) of process `rank` in a pass over a split: whole shards per process when there
    are at least as many shards as processes, otherwise every W-th example."""
    by_shard = num_shards >= world
    return (lambda j: not by_shard or j % world == rank), (lambda i: by_shard or i % world == rank)


def eval_examples(cfg: DataConfig, split: str = "test", num: int | None = None, rank: int | None = None,
                  world: int | None = None) -> tuple[Tensor, Tensor, int]:
    """This process's share of one deterministic pass over a split: (uint8 images, ids, skipped).

    num: N evenly spaced examples instead of all (test sets are often sorted by class). Across the
    processes every chosen example is held exactly once: whole shards per process when there are at
    least as many shards as processes, otherwise every W-th example.
    """
    if rank is None or world is None:
        rank, world = process_group()
    shards = open_split(cfg, split)
    chosen = None
    if num is not None and num < shards.count:
        chosen = set(torch.linspace(0, shards.count - 1, num).round().long().tolist())
    keep_shard, mine = share_of_split(len(shards.urls), rank, world)

    def keep(i: int) -> bool:
        return mine(i) and (chosen is None or i in chosen)

    stats = ReadStats(cfg.strict)
    items = list(iterate_split(shards, stats, keep_shard, keep))
    images = torch.stack([x for x, _, _ in items]) if items else torch.zeros((0, *shards.shape), dtype=torch.uint8)
    return images, torch.tensor([i for _, _, i in items], dtype=torch.long), stats.skipped


def cached_eval_examples(cfg: DataConfig, num: int | None) -> Callable[[], tuple[Tensor, Tensor]]:
    """This process's share of `num` evenly spaced test examples as (images, ids): read on the first
    call and kept (for evaluation during training)."""
    cache: list[tuple[Tensor, Tensor]] = []

    def get() -> tuple[Tensor, Tensor]:
        if not cache:
            cache.append(eval_examples(cfg, "test", num)[:2])
        return cache[0]

    return get
