import io
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name configs/... relative to the repository root, wherever pytest was started."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps process-wide singleton state (e.g. mixed precision); each test trains as a new
    process would, as accelerate's own test suite does between tests."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in MNIST subset as shards (train 4,500 in 5 shards, test 500 in 1), made once per session."""
    from latent_ndm.data.writer import make_shards

    out = tmp_path_factory.mktemp("mnist5k")
    make_shards("mnist5k", out, maxcount=1000)
    return out


def write_webdataset_shards(folder: Path, split: str, images, labels, per_shard: int, ext: str = "jpg",
                            label: str = "cls") -> None:
    """Shards as other tools write them: webdataset's own ShardWriter, PIL images encoded by webdataset
    (JPEG for .jpg), labels as .cls or inside a .json, and no manifest."""
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (image, y) in enumerate(zip(images, labels)):
            array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            payload = Image.fromarray(array)
            if ext == "webp":  # webdataset has no WebP encoder: bytes, as img2dataset writes them
                buf = io.BytesIO()
                payload.save(buf, format="WEBP")
                payload = buf.getvalue()
            sample = {"__key__": f"{split}{i:06d}", ext: payload}
            sample |= {"cls": int(y)} if label == "cls" else {"json": {"label": int(y), "caption": "a digit"}}
            sink.write(sample)


@pytest.fixture(scope="session")
def webdataset_jpg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 train (3 shards) and 100 test MNIST digits as webdataset-written JPEG shards without a manifest."""
    from latent_ndm.data.sources import load_mnist5k

    out = tmp_path_factory.mktemp("wds_jpg")
    for split, n, per in (("train", 600, 200), ("test", 100, 100)):
        data = load_mnist5k(split)
        pick = np.linspace(0, len(data) - 1, n).round().astype(int)  # every class
        write_webdataset_shards(out, split, data.images[pick], data.labels[pick], per)
    return out
