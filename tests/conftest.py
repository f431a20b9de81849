from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name configs/... relative to the repository root, wherever pytest was started."""
    monkeypatch.chdir(ROOT)
