from pathlib import Path

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
    from latent_ndm.data.shards import make_shards

    out = tmp_path_factory.mktemp("mnist5k")
    make_shards("mnist5k", out, maxcount=1000)
    return out
