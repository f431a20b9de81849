"""make_shards on real-world folders: per-image conversions, splits that never silently coincide, bad
files named or skipped and counted, the same bytes for any number of workers, downsampled ImageNet."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_ndm.data.images import BadImage, Conversion, convert_image, open_image
from latent_ndm.data.shards import ReadStats, dataset_version, load_manifest, read_split, shard_samples, split_shards
from latent_ndm.data.sources import IMAGENET_VERSIONS, folder_source, held_out
from latent_ndm.data.writer import main as make_shards_main
from latent_ndm.data.writer import make_shards


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def mixed_folder(root: Path, n: int = 40, classes: int = 2) -> list[str]:
    """n images of assorted sizes (15-40 px) and modes (RGB JPEG, grey JPEG, RGBA PNG, palette PNG)."""
    names = []
    for i in range(n):
        h, w = 15 + (7 * i) % 26, 15 + (11 * i) % 26
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(rgb(h, w, i))
        kind = i % 4
        if kind == 1:
            im = im.convert("L")
        elif kind == 2:
            im = im.convert("RGBA")
        elif kind == 3:
            im = im.convert("P")
        name = f"class{i % classes}/img{i:03d}." + ("png" if kind >= 2 else "jpg")
        im.save(root / name)
        names.append(name)
    return names


def stored_keys(shards: Path, split: str) -> list[str]:
    return [s["__key__"] for url in split_shards(shards, split).urls for s in shard_samples(url, ReadStats())]


# ----------------------------------------------------------------------------- conversions, one image


def test_exif_orientation_is_applied_before_anything_else() -> None:
    arr = rgb(4, 6, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im = Image.fromarray(arr)
    im.info["exif"] = exif.tobytes()
    im.getexif()[0x0112] = 6
    out = convert_image(im, Conversion())
    assert out.shape == (3, 6, 4)
    assert np.array_equal(out, np.rot90(arr, k=-1).transpose(2, 0, 1))


def test_modes_become_8_bit_grey_or_rgb() -> None:
    conv = Conversion(background=200)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept; the others transparent: background
    out = convert_image(Image.fromarray(rgba, "RGBA"), conv)
    assert out.shape == (3, 2, 2) and list(out[:, 0, 0]) == [10, 20, 30] and (out[:, 1, 1] == 200).all()
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    assert convert_image(la, conv).tolist() == [[[50, 200]]]
    i16 = Image.fromarray(np.array([[0, 257 * 7, 65535]], np.uint16))  # mode I;16
    assert i16.mode.startswith("I;16") and convert_image(i16, conv).tolist() == [[[0, 7, 255]]]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink: white
    assert (convert_image(cmyk, conv) == 255).all() and convert_image(cmyk, conv).shape == (3, 2, 2)
    pal = Image.fromarray(rgb(3, 3, 1)).convert("P")
    assert convert_image(pal, conv).shape == (3, 3, 3)
    grey = Image.fromarray(np.full((2, 2), 9, np.uint8))
    assert convert_image(grey, Conversion(channels=3)).tolist() == [[[9, 9], [9, 9]]] * 3
    assert convert_image(Image.new("1", (2, 1), 1), conv).tolist() == [[[255, 255]]]
    keyed = Image.fromarray(np.array([[7, 9]], np.uint8))
    keyed.info["transparency"] = 9  # a PNG tRNS colour key: that grey level is transparent
    assert convert_image(keyed, conv).tolist() == [[[7, 200]]]


def test_non_square_images_are_cropped_to_the_short_side_then_resized() -> None:
    arr = rgb(20, 40, 3)
    out = convert_image(Image.fromarray(arr), Conversion(resize=10))
    want = np.asarray(Image.fromarray(arr[:, 10:30]).resize((10, 10), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(out, want)
    crop = convert_image(Image.fromarray(arr), Conversion(center_crop=8))
    assert np.array_equal(crop, arr[6:14, 16:24].transpose(2, 0, 1))
    with pytest.raises(BadImage, match=r"cat\.png: 40x20 pixels is too small for --center-crop 32"):
        convert_image(Image.fromarray(arr), Conversion(center_crop=32), "cat.png")


# ----------------------------------------------------------------------------- splits


def test_folder_without_splits_needs_a_hold_out_and_gets_disjoint_covering_splits(tmp_path: Path) -> None:
    names = mixed_folder(tmp_path / "pics", 60)
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match="no train/ and test/ sub-folders: pass --test-fraction"):
        make_shards("folder", out, root=str(tmp_path / "pics"), resize=16)
    manifest = make_shards("folder", out, root=str(tmp_path / "pics"), resize=16, test_fraction=0.1, maxcount=16)
    src = folder_source(tmp_path / "pics", test_fraction=0.1)
    train, test = list(src.splits["train"].names), list(src.splits["test"].names)
    assert not set(train) & set(test) and sorted(train + test) == sorted(names) and 0 < len(test) < 15
    assert manifest["splits"]["train"]["count"] == len(train) and manifest["splits"]["test"]["count"] == len(test)
    assert manifest["splits"]["train"]["shape"] == [3, 16, 16] and "hold-out" in manifest["split_rule"]
    # The stored pixels are the converted files, labels their class folders.
    back = read_split(out, "test")
    for k, name in enumerate(test):
        want = convert_image(open_image(str(tmp_path / "pics" / name), name), Conversion(channels=3, resize=16))
        assert np.array_equal(back.images[k], want) and back.labels[k] == int(name[5])
    # Adding images never moves old ones between splits.
    assert all(held_out(n, 0.1) == (n in test) for n in names)
    mixed_folder(tmp_path / "more", 90)
    grown = folder_source(tmp_path / "more", test_fraction=0.1)
    old = set(names)
    assert sorted(n for n in grown.splits["test"].names if n in old) == sorted(test)


def test_other_split_rules_and_their_errors(tmp_path: Path) -> None:
    mixed_folder(tmp_path / "a" / "train", 8)
    mixed_folder(tmp_path / "a" / "test", 4)
    manifest = make_shards("folder", tmp_path / "s1", root=str(tmp_path / "a"), resize=8)
    assert [manifest["splits"][s]["count"] for s in ("train", "test")] == [8, 4]
    with pytest.raises(ValueError, match="already has train/ and test/"):
        make_shards("folder", tmp_path / "s2", root=str(tmp_path / "a"), resize=8, test_fraction=0.5)
    manifest = make_shards("folder", tmp_path / "s3", root=str(tmp_path / "a" / "train"), resize=8,
                           test_folder=str(tmp_path / "a" / "test"))
    assert [manifest["splits"][s]["count"] for s in ("train", "test")] == [8, 4]
    with pytest.raises(ValueError, match="overlap"):
        make_shards("folder", tmp_path / "s4", root=str(tmp_path / "a" / "train"), resize=8,
                    test_folder=str(tmp_path / "a" / "train" / "class0"))
    mixed_folder(tmp_path / "b" / "train", 20)
    with pytest.raises(ValueError, match="has a train/ sub-folder but no test/"):
        make_shards("folder", tmp_path / "s5", root=str(tmp_path / "b"))
    manifest = make_shards("folder", tmp_path / "s5", root=str(tmp_path / "b"), resize=8, test_fraction=0.3)
    assert sum(manifest["splits"][s]["count"] for s in ("train", "test")) == 20 and manifest["classes"] == 2
    # Mixed sizes without --resize: the error names the file and the flag that is missing.
    with pytest.raises(ValueError, match=r"img\d+\.(jpg|png) becomes .* pass --resize S"):
        make_shards("folder", tmp_path / "s6", root=str(tmp_path / "a"))
    assert not (tmp_path / "s6" / "manifest.json").exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_files_are_named_or_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "pics"
    mixed_folder(root, 12)
    good = root / "class0" / "img000.jpg"
    (root / "class0" / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "class1" / "empty.png").write_bytes(b"")
    (root / "class1" / "text.jpg").write_text("not an image")
    (root / "class1" / "notes.txt").write_text("ignored: not an image suffix")
    (root / "class1" / "loop").symlink_to(root / "class1")  # a directory loop
    (root / "class0" / "dangling.png").symlink_to(root / "nowhere.png")
    unreadable = root / "class0" / "secret.png"
    Image.fromarray(rgb(20, 20, 5)).save(unreadable)
    unreadable.chmod(0)
    bad = {"truncated.jpg", "empty.png", "text.jpg", "loop", "dangling.png"}
    if os.geteuid() != 0:  # root reads any file
        bad.add("secret.png")
    else:
        unreadable.chmod(0o644)
    args = ["folder", str(tmp_path / "out"), "--root", str(root), "--resize", "8", "--test-fraction", "0.2"]
    assert make_shards_main(args) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and any(name in err for name in bad), err
    assert not (tmp_path / "out" / "manifest.json").exists() and not list((tmp_path / "out").glob("*.partial"))

    assert make_shards_main([*args, "--skip-bad"]) == 0
    manifest = load_manifest(tmp_path / "out")
    skipped = [m for s in manifest["splits"].values() for m in s["skipped_examples"]] + manifest["unreadable_entries"]
    assert sorted(n for n in bad if any(n in m for m in skipped)) == sorted(bad)
    assert sum(s["skipped"] for s in manifest["splits"].values()) + len(manifest["unreadable_entries"]) == len(bad)
    assert sum(s["count"] for s in manifest["splits"].values()) == 12 + (os.geteuid() == 0)
    assert manifest["ignored_files"] == 1 and manifest["ignored_examples"] == ["class1/notes.txt"]


# ----------------------------------------------------------------------------- streaming, workers


def test_any_number_of_workers_writes_byte_identical_shards(tmp_path: Path) -> None:
    mixed_folder(tmp_path / "pics", 50)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        make_shards("folder", out, root=str(tmp_path / "pics"), resize=12, test_fraction=0.2, maxcount=8,
                    workers=workers)
        runs[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | {
            "manifest": json.loads((out / "manifest.json").read_text())["splits"]}
    assert len(runs[1]) > 4 and runs[1] == runs[2]
    keys = stored_keys(tmp_path / "w1", "train")
    assert sorted(keys) != keys and len(set(keys)) == len(keys)  # shuffled, each image once


# ----------------------------------------------------------------------------- downsampled ImageNet


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_npz_batches(tmp_path: Path, size: int) -> None:
    """The official npz format: `data` rows of 3*S*S uint8 (R, G, B planes), 1-based `labels`."""
    rng = np.random.default_rng(size)
    root = tmp_path / f"Imagenet{size}_train_npz"
    root.mkdir()
    batches = [rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8) for n in (5, 7)]
    labels = [rng.integers(1, 1001, n) for n in (5, 7)]
    for k, (data, lab) in enumerate(zip(batches, labels), 1):
        # One stored (np.savez: memory-mapped) and one compressed batch (extracted first).
        (np.savez if k == 1 else np.savez_compressed)(root / f"train_data_batch_{k}.npz", data=data, labels=lab,
                                                      mean=data.mean(0))
    val = rng.integers(0, 256, (4, 3 * size * size), dtype=np.uint8)
    np.savez(tmp_path / "val_data.npz", data=val, labels=np.array([1, 1000, 3, 4]))
    manifest = make_shards(f"imagenet{size}-npz", tmp_path / "out", root=str(tmp_path), workers=2)
    assert manifest["dataset_version"] == dataset_version(tmp_path / "out") == IMAGENET_VERSIONS["npz"]
    test = read_split(tmp_path / "out", "test")
    assert np.array_equal(test.images, val.reshape(-1, 3, size, size)) and list(test.labels) == [0, 999, 2, 3]
    train = read_split(tmp_path / "out", "train")
    index = [int(k.split("_")[1]) for k in stored_keys(tmp_path / "out", "train")]
    all_rows, all_labels = np.concatenate(batches).reshape(-1, 3, size, size), np.concatenate(labels) - 1
    assert sorted(index) == list(range(12))
    assert np.array_equal(train.images, all_rows[index]) and np.array_equal(train.labels, all_labels[index])
    other = 64 if size == 32 else 32
    with pytest.raises(ValueError, match=f"is this the {other}x{other} version"):
        make_shards(f"imagenet{other}-npz", tmp_path / "wrong", root=str(tmp_path))


def test_imagenet_png_folders_record_their_version(tmp_path: Path) -> None:
    for folder, n in (("train_32x32", 6), ("valid_32x32", 3)):
        (tmp_path / "old" / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rgb(32, 32, i)).save(tmp_path / "old" / folder / f"{i + 1:07d}.png")
    manifest = make_shards("imagenet32-png", tmp_path / "out", root=str(tmp_path / "old"))
    assert manifest["dataset_version"] == IMAGENET_VERSIONS["png"]
    assert [manifest["splits"][s]["count"] for s in ("train", "test")] == [6, 3]
    assert np.array_equal(read_split(tmp_path / "out", "test").images[2], rgb(32, 32, 2).transpose(2, 0, 1))
    with pytest.raises(FileNotFoundError, match="train_64x64/ and valid_64x64/ not found"):
        make_shards("imagenet64-png", tmp_path / "out64", root=str(tmp_path / "old"))
