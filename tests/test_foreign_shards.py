"""Training straight from shards written by other tools: no manifest, JPEG/WebP samples, .cls or .json
labels, counts from one cached scan, exact resume, and refused member names and duplicate keys."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_webdataset_shards
from PIL import Image

import latent_ndm.data.shards as shards_module
from latent_ndm.config import DataConfig, load_config
from latent_ndm.data.images import Conversion, convert_image, open_image
from latent_ndm.data.shards import INDEX, ReadStats, ShardFormatError, shard_samples
from latent_ndm.data.streams import eval_examples, open_split, train_batches
from latent_ndm.tasks.pixel import pixel_task
from latent_ndm.training.loop import train


def cfg_for(folder: Path, **kw) -> DataConfig:
    return DataConfig(**{"shards": str(folder), "channels": 1, "image_size": 28, "num_workers": 0, "lanes": 2} | kw)


def decoded_jpegs(folder: Path, split: str, conv: Conversion) -> list[np.ndarray]:
    """Every stored sample, decoded independently of the project's reader (tarfile + PIL)."""
    out = []
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out.append(convert_image(Image.open(io.BytesIO(tar.extractfile(m).read())), conv))
    return out


def test_counts_come_from_one_cached_scan(webdataset_jpg_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = webdataset_jpg_shards
    train = open_split(cfg_for(folder), "train")
    assert train.counts == [200, 200, 200] and train.shape == (1, 28, 28) and train.foreign is not None
    index = json.loads((folder / INDEX).read_text())
    assert index["train"]["counts"] == [200, 200, 200]

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again although the index matches")

    monkeypatch.setattr(shards_module, "scan_split", no_scan)
    assert open_split(cfg_for(folder), "train").counts == [200, 200, 200]


def test_images_labels_and_exact_resume(webdataset_jpg_shards: Path) -> None:
    folder = webdataset_jpg_shards
    cfg = cfg_for(folder)
    batches = [b for _, b in zip(range(6), train_batches(cfg, 64, 0))]
    want = decoded_jpegs(folder, "train", Conversion(channels=1, resize=28))
    for batch in batches:  # the pixels are the stored JPEGs, decoded
        assert torch.equal(batch.images, torch.from_numpy(np.stack([want[i] for i in batch.ids.tolist()])))
    for start in (2, 5):
        resumed = [b for _, b in zip(range(1), train_batches(cfg, 64, 0, start_step=start))][0]
        assert torch.equal(resumed.ids, batches[start].ids) and torch.equal(resumed.images, batches[start].images)
    images, ids, skipped = eval_examples(cfg, "test")
    assert len(ids) == 100 and skipped == 0
    labels = [int(s["cls"]) for s in shard_samples(str(folder / "test-000000.tar"), ReadStats())]
    assert sorted(set(labels)) == list(range(10))


def test_an_unfinished_make_shards_folder_is_never_read(tmp_path: Path) -> None:
    from latent_ndm.data.writer import INCOMPLETE, make_shards

    make_shards("digits", tmp_path, maxcount=500)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / INCOMPLETE).write_text("")  # as a make_shards run stopped half-way leaves it
    with pytest.raises(FileNotFoundError, match="was not finished"):
        open_split(cfg_for(tmp_path, image_size=8), "train")


def test_two_training_steps_from_webdataset_jpg_shards(webdataset_jpg_shards: Path, tmp_path: Path) -> None:
    nets = [f"model.{n}.{o}" for n in ("denoiser", "transform_net") for o in ("channels=8", "channel_mult=[1,2]",
                                                                             "groups=4")]
    cfg = load_config("configs/ndm_mnist.yaml", [
        f"out_dir={tmp_path}", "name=wds", f"data.shards={webdataset_jpg_shards}", "data.num_workers=1",
        "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
        "train.sample_every=0", "train.ckpt_every=2", "eval.final_examples=20", *nets])
    run_dir = train(cfg, pixel_task(cfg))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    report = json.loads((run_dir / "test_report.json").read_text())["nelbo"]
    assert report["num_images"] == 20 and 0 < report["bpd"] < 20


def test_other_keys_json_labels_and_resizing_on_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 3, 20, 24), dtype=np.uint8)
    for split, part in (("train", slice(0, 8)), ("test", slice(8, 12))):
        write_webdataset_shards(tmp_path, split, images[part], np.arange(12)[part], 4, ext="webp", label="json")
    cfg = cfg_for(tmp_path, channels=3, image_size=16, image_keys="webp", label_key="json.label")
    images_back, ids, _ = eval_examples(cfg, "test")
    from latent_ndm.data.shards import iterate_split

    labels = [y for _, y, _ in iterate_split(open_split(cfg, "test"), ReadStats())]
    assert labels == [8, 9, 10, 11] and images_back.shape == (4, 3, 16, 16)
    with tarfile.open(tmp_path / "test-000000.tar") as tar:
        first = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".webp"))).read()
    want = convert_image(open_image(first, "x"), Conversion(channels=3, resize=16))
    assert torch.equal(images_back[0], torch.from_numpy(want))
    with pytest.warns(UserWarning, match="hold none of the image keys jpg"):
        open_split(cfg_for(tmp_path, channels=3, image_size=16, image_keys="jpg", test_urls=""), "train")


def test_refused_member_names_duplicate_keys_and_overlapping_splits(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, format="PNG")
    folder = tmp_path / "shards"
    folder.mkdir()

    def tar_with(name: str, members: list[str]) -> None:
        with tarfile.open(folder / name, "w") as tar:
            for member in members:
                info = tarfile.TarInfo(member)
                info.size = len(png.getvalue())
                tar.addfile(info, io.BytesIO(png.getvalue()))

    tar_with("test-000000.tar", ["t0.png"])
    tar_with("train-000000.tar", ["a.png", "../escape.png"])
    cfg = cfg_for(folder, image_size=4)
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar: member name '\.\./escape' points outside"):
        open_split(cfg, "train")
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.rglob("escape*"))
    tar_with("train-000000.tar", ["a.png", "b.png"])
    tar_with("train-000001.tar", ["c.png", "a.png"])
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: key 'a' appears twice \(first in .*000000"):
        open_split(cfg, "train")
    (folder / "train-000001.tar").unlink()
    assert open_split(cfg, "train").counts == [2]  # the changed shards were scanned again
    # Counts the user writes are trusted; a shard with more samples than its count stops the run.
    index = json.loads((folder / INDEX).read_text())
    index["train"] = {"urls": index["train"]["urls"], "counts": [1]}
    (folder / INDEX).write_text(json.dumps(index))
    assert open_split(cfg, "train").counts == [1]
    with pytest.raises(ShardFormatError, match="holds 2 samples but its manifest or index says 1"):
        next(train_batches(cfg, 2, 0))
    (folder / INDEX).unlink()
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for member, payload in (("a.png", png.getvalue()), ("a.cls", b"cat")):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardFormatError, match=r"key 'a': the label under 'cls' is not an integer"):
        open_split(cfg, "train")
    assert open_split(cfg_for(folder, image_size=4, label_key="none"), "train").counts == [1]
    with pytest.raises(ValueError, match="the train and test shards overlap"):
        open_split(cfg_for(folder, image_size=4, test_urls=str(folder / "train-000000.tar")), "test")
    (folder / "test-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"no manifest.json and no test-\*\.tar shards"):
        open_split(cfg, "train")
