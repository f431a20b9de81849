"""The sharded training stream and evaluation pass: process split, epochs, exact resume, bad data."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_ndm.config import DataConfig
from latent_ndm.data.images import encode_png
from latent_ndm.data.shards import ShardFormatError, read_split
from latent_ndm.data.streams import eval_examples, train_batches
from latent_ndm.data.writer import make_shards


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn digits: 1,437 train images in 15 shards of <= 100, 360 test images in 4."""
    out = tmp_path_factory.mktemp("digits")
    make_shards("digits", out, maxcount=100)
    return out


def data_cfg(shards: Path, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), channels=1, image_size=8, **kw)


def take(stream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def test_processes_split_the_global_batch_and_workers_do_not_change_it(digits: Path) -> None:
    one = take(train_batches(data_cfg(digits, lanes=4, num_workers=0), 16, 0), 3)
    two = [take(train_batches(data_cfg(digits, lanes=4, num_workers=w), 16, 0, rank=r, world=2), 3)
           for r, w in ((0, 2), (1, 1))]
    train = read_split(digits, "train").images
    for step in range(3):
        a, b = two[0][step], two[1][step]
        assert a.lanes == [0, 2] and b.lanes == [1, 3] and len(a.ids) == len(b.ids) == 8
        assert not set(a.ids.tolist()) & set(b.ids.tolist())
        # Lane l's chunk is the same samples whichever process and worker decodes it.
        merged = torch.cat([torch.cat([a.ids[4 * k : 4 * k + 4], b.ids[4 * k : 4 * k + 4]]) for k in range(2)])
        assert torch.equal(merged, one[step].ids)
        for batch in (a, b, one[step]):  # the pixels are the stored images of those ids
            assert torch.equal(batch.images, torch.from_numpy(train[batch.ids.numpy()]))


def test_each_lane_epoch_is_a_permutation_and_resume_is_exact(digits: Path) -> None:
    cfg = data_cfg(digits, lanes=2, num_workers=0)
    batches = take(train_batches(cfg, 64, 3), 50)  # 32 samples per lane per step: an epoch is ~45 steps
    lane0 = torch.cat([b.ids[:32] for b in batches])
    assert sorted(lane0[:1437].tolist()) == list(range(1437))  # every train image once per epoch
    assert not torch.equal(lane0[1437:1437 + 100], lane0[:100])  # the next epoch is a new order
    assert not torch.equal(lane0[:100], torch.cat([b.ids[32:] for b in batches])[:100])  # lanes differ
    for start in (44, 45):  # resuming just before and across the epoch boundary
        resumed = take(train_batches(cfg, 64, 3, start_step=start), 3)
        for got, want in zip(resumed, batches[start:]):
            assert torch.equal(got.ids, want.ids) and torch.equal(got.images, want.images)


def test_any_webdataset_url_works_brace_patterns_and_pipes(digits: Path) -> None:
    local = take(train_batches(data_cfg(digits, lanes=2, num_workers=0), 32, 1), 3)
    urls = f"pipe:cat {digits}/train-{{000000..000014}}.tar"
    piped = take(train_batches(data_cfg(digits, lanes=2, num_workers=0, train_urls=urls), 32, 1), 3)
    for a, b in zip(local, piped):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="expands to 2 shards but the manifest lists 15"):
        next(train_batches(data_cfg(digits, train_urls=f"{digits}/train-{{000000..000001}}.tar"), 8, 0))


def test_horizontal_flips_are_seeded_and_affect_about_half(digits: Path) -> None:
    plain = take(train_batches(data_cfg(digits, lanes=1, num_workers=0), 64, 0), 4)
    flipped = take(train_batches(data_cfg(digits, lanes=1, num_workers=0, hflip=True), 64, 0), 4)
    again = take(train_batches(data_cfg(digits, lanes=1, num_workers=0, hflip=True), 64, 0), 4)
    n_flipped = 0
    for p, f, g in zip(plain, flipped, again):
        assert torch.equal(p.ids, f.ids) and torch.equal(f.images, g.images)
        same, mirrored = (f.images == p.images).flatten(1).all(1), (f.images == p.images.flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()
        n_flipped += int((mirrored & ~same).sum())
    assert 80 < n_flipped < 176  # of 256: Binomial(256, 1/2) up to the few symmetric images


def rewrite_pngs(shard: Path, count: int, payload: bytes) -> None:
    """Replace the first `count` PNGs of a shard by `payload`."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            data = payload if m.name.endswith(".png") and i < 2 * count else data  # members: .cls, .png per key
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_bad_training_data_is_skipped_and_counted_or_fatal(tmp_path: Path) -> None:
    make_shards("digits", tmp_path, maxcount=500)  # 3 train shards
    rewrite_pngs(tmp_path / "train-000001.tar", 10, b"not a png")
    cfg = data_cfg(tmp_path, lanes=1, num_workers=0)
    with pytest.warns(UserWarning, match="skipping unreadable data"):
        batches = take(train_batches(cfg, 100, 0), 15)  # a whole epoch
    assert sum(b.skipped for b in batches) == 10 and all(len(b.ids) == 100 for b in batches)
    # Each bad sample's place is taken by another sample of its step: resuming anywhere stays exact.
    for start in (4, 7, 11):
        for got, want in zip(take(train_batches(cfg, 100, 0, start_step=start), 3), batches[start:]):
            assert torch.equal(got.ids, want.ids) and torch.equal(got.images, want.images)
    with pytest.raises(Exception, match="cannot identify image"):
        take(train_batches(data_cfg(tmp_path, lanes=1, num_workers=0, strict=True), 100, 0), 15)
    # A wrong shape is fatal even when skipping is allowed, and names shard and key.
    rewrite_pngs(tmp_path / "train-000002.tar", 1, encode_png(np.zeros((1, 8, 9), np.uint8)))
    with pytest.raises(ShardFormatError, match=r"train-000002\.tar, key train_\d+: image is \[1, 8, 9\]"):
        take(train_batches(cfg, 100, 0), 15)


def test_bad_layouts_are_clear_errors(digits: Path) -> None:
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        next(train_batches(data_cfg(digits, lanes=3), 12, 0, rank=0, world=2))
    with pytest.raises(ValueError, match="multiple of data.lanes=4"):
        next(train_batches(data_cfg(digits, lanes=4), 10, 0))
    with pytest.raises(ValueError, match="config says data.channels=3"):
        next(train_batches(DataConfig(shards=str(digits), channels=3, image_size=8), 8, 0))
    with pytest.raises(FileNotFoundError, match="make shards first"):
        next(train_batches(DataConfig(shards=str(digits / "nowhere")), 8, 0))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_evaluation_pass_holds_each_example_once(digits: Path, world: int) -> None:
    """4 test shards: by whole shards for 2 and 3 processes, by every W-th example for 5."""
    cfg = data_cfg(digits)
    full, full_ids, _ = eval_examples(cfg, "test", rank=0, world=1)
    assert torch.equal(full_ids, torch.arange(360)) and torch.equal(full, torch.from_numpy(
        read_split(digits, "test").images))
    for num in (None, 50):
        parts = [eval_examples(cfg, "test", num, rank=r, world=world) for r in range(world)]
        ids = torch.cat([p[1] for p in parts])
        want = torch.arange(360) if num is None else torch.linspace(0, 359, 50).round().long()
        assert torch.equal(torch.sort(ids).values, want)
        for images, part_ids, _ in parts:
            assert torch.equal(images, full[part_ids])
