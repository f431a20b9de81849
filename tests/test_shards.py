"""Shards: exact round trips with a correct manifest, skipped-and-counted corruption, fatal shape errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_ndm.data.shards import ReadStats, ShardFormatError, load_manifest, read_split, shard_samples, split_shards
from latent_ndm.data.sources import load_folder, load_mnist5k, load_npz
from latent_ndm.data.writer import make_shards


def test_mnist5k_round_trips_exactly(mnist_shards: Path) -> None:
    manifest = load_manifest(mnist_shards)
    train = manifest["splits"]["train"]
    assert train["count"] == 4500 and train["shape"] == [1, 28, 28] and train["dtype"] == "uint8"
    assert len(train["shards"]) == 5 and manifest["splits"]["test"]["count"] == 500
    assert train["shard_counts"] == [1000, 1000, 1000, 1000, 500] and train["shuffled"]
    assert manifest["source"] == "mnist5k"
    for split in ("train", "test"):
        back, want = read_split(mnist_shards, split), load_mnist5k(split)
        # Keys hold the source index: the train split is stored shuffled, the test split in order.
        keys = [s["__key__"] for url in split_shards(mnist_shards, split).urls for s in shard_samples(url, ReadStats())]
        source_index = np.array([int(k.split("_")[1]) for k in keys])
        assert sorted(source_index) == list(range(len(want)))
        assert (split == "test") == bool(np.all(source_index == np.arange(len(want))))
        assert np.array_equal(back.images, want.images[source_index])
        assert np.array_equal(back.labels, want.labels[source_index])


@pytest.mark.parametrize(("source", "shape"), [("digits", [1, 8, 8]), ("photo-patches", [3, 32, 32])])
def test_built_in_sources(tmp_path: Path, source: str, shape: list[int]) -> None:
    manifest = make_shards(source, tmp_path)
    for split in ("train", "test"):
        entry = manifest["splits"][split]
        assert entry["shape"] == shape and entry["count"] == len(read_split(tmp_path, split))
        assert sum(entry["shard_counts"]) == entry["count"]
    if source == "digits":
        assert read_split(tmp_path, "train").images.max() == 255


def test_folder_and_npz_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        d = tmp_path / "folder" / ("cats" if i < 3 else "dogs")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")
    data = load_folder(tmp_path / "folder")
    assert data.images.shape == (6, 3, 12, 10) and list(data.labels) == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(data.images, imgs.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "a.npz", images=imgs[..., 0])  # stored: memory-mapped in place
    assert np.array_equal(load_npz(tmp_path / "a.npz").images, imgs[:, None, :, :, 0])
    np.savez_compressed(tmp_path / "c.npz", images=imgs, labels=np.arange(6))  # compressed: extracted first
    assert np.array_equal(load_npz(tmp_path / "c.npz").images, imgs.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "two.npz", images=imgs[..., :2])
    with pytest.raises(ValueError, match="C = 1 or 3"):
        load_npz(tmp_path / "two.npz")
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "train.npz", images=imgs, labels=np.arange(6))
    np.savez_compressed(tmp_path / "npz" / "test.npz", images=imgs[:2], labels=np.arange(2))
    make_shards("npz", tmp_path / "npz_shards", root=str(tmp_path / "npz"), shuffle_seed=None)
    assert not (tmp_path / "npz_shards" / ".extracted").exists()  # the extracted copy is removed
    for split, n in (("train", 6), ("test", 2)):
        back = read_split(tmp_path / "npz_shards", split)
        assert np.array_equal(back.images, imgs[:n].transpose(0, 3, 1, 2)) and list(back.labels) == list(range(n))
    with pytest.raises(FileNotFoundError, match="no images"):
        (tmp_path / "empty").mkdir()
        load_folder(tmp_path / "empty")
    np.savez(tmp_path / "f.npz", images=imgs.astype(np.float32))
    with pytest.raises(TypeError, match="must be uint8"):
        load_npz(tmp_path / "f.npz")


def test_corrupt_data_is_skipped_and_counted_or_fatal(tmp_path: Path) -> None:
    make_shards("digits", tmp_path, maxcount=100)
    good = len(read_split(tmp_path, "test"))
    shard = tmp_path / "test-000001.tar"
    # Replace one PNG by garbage bytes, and truncate another shard half-way.
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_png = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            if m.name == first_png:
                payload = b"not a png"
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    last = tmp_path / "test-000003.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    stats = ReadStats()
    with pytest.warns(UserWarning, match="skipping unreadable data"):
        partial = read_split(tmp_path, "test", stats=stats)
    assert stats.skipped >= 2 and len(partial) < good - 1
    with pytest.raises(Exception):  # noqa: B017 - the switch makes any damage fatal
        read_split(tmp_path, "test", strict=True)


def test_wrong_shape_stops_at_once_naming_shard_and_key(tmp_path: Path) -> None:
    make_shards("digits", tmp_path, maxcount=1000)
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"channels": 1', '"channels": 3')
                             .replace("[\n        1,\n        8,\n        8\n      ]", "[3, 8, 8]"))
    with pytest.raises(ShardFormatError, match=r"test-000000\.tar, key test_00000000: image is \[1, 8, 8\]"):
        read_split(tmp_path, "test")


def test_missing_torchvision_data_names_what_to_provide(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        make_shards("cifar10", tmp_path / "out", root=str(tmp_path / "nothing"))
