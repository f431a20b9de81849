"""Pre-encoded latents for stage 2: the frozen VAE's posterior q(z0|x) of every train image, as shards.

`python -m latent_ndm.cli encode_latents VAE_DIR SHARDS_DIR OUT_DIR` (scripts/encode_latents.sh) writes
OUT_DIR/train-NNNNNN.tar, one per source train shard, holding the same samples in the same order under
the same keys, each with an `.npy` payload: float32 [2c, h, w], the posterior's mean (channels :c) and
log-variance (c:) over the VAE's *normalised* latents (`VAE.posterior`). Since an example's id is its
position in the split, it keeps its id, and the lane stream (latent_ndm.data.streams) reads these shards
exactly as it reads the images: the same examples at the same steps, with the same keyed noise.

OUT_DIR/manifest.json has the usual `splits.train` entry plus the latent and image shapes, the source
shards and the VAE's fingerprint (a hash of its weights): training with another VAE is refused. Only
the train split is encoded: evaluation always reads test images and encodes them through the VAE.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from latent_ndm.data.shards import (
    MANIFEST,
    ReadStats,
    SplitShards,
    decode_sample,
    load_manifest,
    shard_samples,
    split_shards,
)
from vae.model import VAE

KIND = "vae-posteriors"


def vae_fingerprint(vae: VAE) -> str:
    """sha256 over the VAE's state (names, dtypes, shapes and values, normalisation included)."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def encode_latents(vae_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, batch_size: int = 256,
                   device: str | torch.device | None = None, progress: bool = False) -> dict:
    """Encode every train image of `shards_dir` with the VAE saved in `vae_dir`; returns the manifest.

    The source is read strictly (an unreadable sample is an error): skipping one would shift every later
    example's id against the images."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = VAE.from_pretrained(vae_dir, device).eval()
    source = split_shards(shards_dir, "train")
    entry = load_manifest(shards_dir)["splits"]["train"]
    if source.shape[0] != vae.config.in_channels or source.shape[1] % vae.factor or source.shape[2] % vae.factor:
        raise ValueError(f"{shards_dir} holds {list(source.shape)} (C, H, W) images, which the VAE {vae_dir} "
                         f"({vae.config.in_channels} channels, factor {vae.factor}) cannot encode")
    latent_shape = vae.latent_shape(tuple(source.shape[1:]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last: a folder interrupted half-way has none and is not mistaken for a whole one.
    for old in (out / MANIFEST, *out.glob("train-*.tar")):
        old.unlink(missing_ok=True)
    stats, counts = ReadStats(strict=True), []
    bar = tqdm(total=source.count, desc="encode latents", unit="img", disable=not progress)
    for name, url in zip(entry["shards"], source.urls):
        samples = list(shard_samples(url, stats))
        # Plain ustar headers with an integer mtime, as make_shards writes (pax headers read slower).
        with wds.TarWriter(str(out / name), format=tarfile.USTAR_FORMAT, mtime=int(time.time())) as sink:
            for start in range(0, len(samples), batch_size):
                part = samples[start : start + batch_size]
                decoded = [decode_sample(s, source.shape) for s in part]
                images = torch.stack([x for x, _ in decoded]).to(device)
                posterior = vae.posterior(VAE.from_uint8(images))
                params = torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu().numpy()  # [B, 2c, h, w]
                for sample, (_, label), p in zip(part, decoded, params):
                    sink.write({"__key__": sample["__key__"], "npy": _npy(p), "cls": str(label)})
                bar.update(len(part))
        counts.append(len(samples))
    bar.close()
    if counts != source.counts:
        raise ValueError(f"{shards_dir}: the train shards hold {counts} samples but the manifest says {source.counts}")
    c, h, w = latent_shape
    manifest = {
        "kind": KIND,
        "payload": "npy: float32 [2c, h, w], mean then log-variance of q(z0|x) over the normalised latents",
        "latent_shape": [c, h, w],
        "image_shape": list(source.shape),
        "vae": {"path": str(vae_dir), "fingerprint": vae_fingerprint(vae)},
        "source": {"shards": str(shards_dir), "train": _layout(entry)},
        "splits": {"train": {"count": sum(counts), "shards": list(entry["shards"]), "shard_counts": counts,
                             "shape": [2 * c, h, w], "dtype": "float32", "channels": 2 * c, "split": "train",
                             "shuffled": entry.get("shuffled", False)}},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _layout(entry: dict) -> dict:
    """What identifies a split's samples and their order, independent of where the shards lie."""
    return {k: entry.get(k) for k in ("count", "shards", "shard_counts", "shape", "shuffled", "source")}


def open_latent_shards(location: str | Path, vae: VAE, image_shape: tuple[int, int, int],
                       image_shards: str | Path | None = None) -> SplitShards:
    """The train split of pre-encoded posteriors, refused unless they came from this VAE (same weights),
    images of `image_shape` (C, H, W) and, when given, the train split of the shard folder `image_shards`."""
    manifest = load_manifest(location)
    if manifest.get("kind") != KIND:
        raise ValueError(f"{location} holds no pre-encoded latents: write them with "
                         f"scripts/encode_latents.sh VAE_DIR SHARDS_DIR {location}")
    recorded, actual = manifest["vae"]["fingerprint"], vae_fingerprint(vae)
    if recorded != actual:
        raise ValueError(f"the latents in {location} were encoded with another VAE ({manifest['vae']['path']}, "
                         f"weights {recorded[:12]}) than this run's (weights {actual[:12]}): encode them again with "
                         f"scripts/encode_latents.sh, or set latents= to encode on the fly")
    if tuple(manifest["image_shape"]) != tuple(image_shape):
        raise ValueError(f"the latents in {location} are of {manifest['image_shape']} (C, H, W) images but the "
                         f"config says {list(image_shape)}")
    if tuple(manifest["latent_shape"]) != vae.latent_shape(tuple(image_shape[1:])):
        raise ValueError(f"the latents in {location} are {manifest['latent_shape']} but the VAE's are "
                         f"{list(vae.latent_shape(tuple(image_shape[1:])))}")
    if image_shards is not None and _layout(load_manifest(image_shards)["splits"]["train"]) != \
            manifest["source"]["train"]:
        raise ValueError(f"the latents in {location} were encoded from the train split of "
                         f"{manifest['source']['shards']}, which differs from data.shards={image_shards}")
    return split_shards(location, "train")
