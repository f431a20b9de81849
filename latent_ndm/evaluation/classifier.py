"""A small image classifier the project trains itself: the feature space of the FD-MNIST metric.

The standard Inception weights of FID cannot be had on machines without internet, so the MNIST
comparisons use the Frechet distance in the 128-d penultimate features of this classifier instead
("FD-MNIST", latent_ndm.evaluation.quality). It is a different metric from FID: its numbers are comparable only
with each other, for the same classifier directory.

    report = train_classifier("data/mnist5k", "runs/mnist_classifier")   # scripts/train_classifier.sh
    clf = ImageClassifier.from_pretrained("runs/mnist_classifier")       # config.json + model.safetensors
    feats = clf.features(images)                                          # uint8 [N, C, H, W] -> float32 [N, 128]
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from latent_ndm.config import DataConfig
from latent_ndm.core.noise import keyed_generator
from latent_ndm.data.shards import ReadStats, SplitShards, shard_samples, split_shards
from latent_ndm.data.streams import eval_examples, open_split, train_batches
from latent_ndm.training.checkpoint import load_weights, save_weights

WEIGHTS, REPORT = "model.safetensors", "report.json"


@dataclass
class ClassifierConfig:
    channels: int = 1
    image_size: int = 28  # two 2x poolings: 28 -> 14 -> 7
    widths: tuple[int, int] = (16, 32)  # channels of the two conv blocks (conv-ReLU-conv-ReLU-maxpool)
    feature_dim: int = 128  # the penultimate layer: the features of the Frechet classifier distance
    num_classes: int = 10


class ImageClassifier(nn.Module):
    """Two conv blocks, a `feature_dim` ReLU layer (the features), a linear layer to the class logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, c = [], config.channels
        for w in config.widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = w
        side = config.image_size // 2 ** len(config.widths)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, config.feature_dim), nn.ReLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> float32 in [-1, 1]."""
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [N, C, H, W], got {images.dtype}")
        return images.float() / 127.5 - 1.0

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [N, num_classes] of preprocessed images [N, C, H, W]."""
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Penultimate features, float32 [N, feature_dim], of uint8 images [N, C, H, W] (eval mode)."""
        c = self.config
        if tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"this classifier takes [N, {c.channels}, {c.image_size}, {c.image_size}] images, "
                             f"got {tuple(images.shape)}")
        was_training, device = self.training, self.head.weight.device
        self.eval()
        out = [self.body(self.preprocess(images[i : i + batch_size].to(device))).cpu()
               for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, c.feature_dim)

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Predicted labels [N] of uint8 images."""
        return self.head(self.features(images, batch_size).to(self.head.weight.device)).argmax(-1).cpu()

    @torch.no_grad()
    def probabilities(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Class probabilities [N, num_classes] of uint8 images."""
        return self.head(self.features(images, batch_size).to(self.head.weight.device)).softmax(-1).cpu()

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        save_weights(self, path / WEIGHTS, metadata={"format": "latent-ndm-classifier"})
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a saved classifier (config.json + {WEIGHTS}); train one with "
                                    f"scripts/train_classifier.sh --out {path}")
        data = json.loads((path / "config.json").read_text())
        known = {f.name for f in fields(ClassifierConfig)}
        cfg = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})
        model = cls(cfg)
        load_weights(model, path / WEIGHTS)
        return model.to(device).eval()


def legibility(model: ImageClassifier, images: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """How readable images are to the classifier: the share it assigns to one class with probability >=
    threshold, and the entropy (bits) of the distribution of predicted classes (diversity; log2 of the number
    of classes when every class is drawn equally often)."""
    probs = model.probabilities(images)
    counts = torch.bincount(probs.argmax(-1), minlength=probs.shape[1]).double()
    share = counts[counts > 0] / counts.sum()
    return {"legible_share": float((probs.max(-1).values >= threshold).double().mean()),
            "class_entropy_bits": float((share * (1 / share).log2()).sum()), "threshold": threshold,  # >= +0.0
            "num_images": len(images)}


def split_labels(shards: SplitShards, strict: bool = False) -> Tensor:
    """Labels [count] of a split indexed by sample id (shard offset + position), read from the `.cls`
    entries without decoding any image; -1 where a sample has none."""
    labels = torch.full((shards.count,), -1, dtype=torch.long)
    stats = ReadStats(strict)
    for url, offset in zip(shards.urls, shards.offsets):
        for pos, sample in enumerate(shard_samples(url, stats)):
            if "cls" in sample:
                labels[offset + pos] = int(sample["cls"])
    return labels


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """Each image translated by up to max_shift pixels in both directions (zero-padded at -1, the background)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: ImageClassifier, images: Tensor, labels: Tensor) -> float:
    return float((model.predict(images) == labels).float().mean())


def train_classifier(shards: str | Path, out_dir: str | Path | None = None, steps: int = 1000, batch_size: int = 64,
                     lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, widths: tuple[int, int] = (16, 32),
                     feature_dim: int = 128, max_shift: int = 2, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True) -> tuple[ImageClassifier, dict]:
    """Train the classifier on the labelled train split of a shard folder (the project's training
    stream, latent_ndm.data.streams), report its accuracy on the whole test split, and save it to out_dir
    (config.json + model.safetensors + report.json) when given. AdamW with a cosine decay; random
    translations of up to max_shift pixels."""
    t0 = time.perf_counter()
    lanes = max(1, num_workers)
    data = DataConfig(shards=str(shards), num_workers=num_workers, lanes=lanes, prefetch=4)
    train_split = split_shards(data.shards, "train")  # any image shape: the classifier takes the manifest's
    data.channels, data.image_size = train_split.shape[0], train_split.shape[1]
    train_labels = split_labels(train_split)
    if (train_labels < 0).any():
        raise ValueError(f"{shards}: {(train_labels < 0).sum()} train samples have no label (.cls)")
    cfg = ClassifierConfig(data.channels, data.image_size, tuple(widths), feature_dim, int(train_labels.max()) + 1)
    with torch.random.fork_rng():  # a seeded initialisation that leaves the global RNG as it was
        torch.manual_seed(seed)
        model = ImageClassifier(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    g = keyed_generator("cpu", seed, "classifier-shift")
    batches = train_batches(data, batch_size, seed, rank=0, world=1, shards=train_split)
    model.train()
    bar = tqdm(range(steps), desc="classifier", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        batch = next(batches)
        x = random_shift(model.preprocess(batch.images), g, max_shift) if max_shift else model.preprocess(batch.images)
        loss = F.cross_entropy(model(x.to(device)), train_labels[batch.ids].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    batches.close()  # stops the decoding workers
    model.eval()
    test_images, test_ids, _ = eval_examples(data, "test", None, 0, 1)
    test_labels = split_labels(open_split(data, "test"))[test_ids]
    report = {"shards": str(shards), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_images": train_split.count, "test_images": len(test_images),
              "test_accuracy": round(accuracy(model, test_images, test_labels), 4),
              "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.perf_counter() - t0, 1)}
    if out_dir is not None:
        model.save_pretrained(out_dir)
        (Path(out_dir) / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        report["out_dir"] = str(out_dir)
    return model, report

