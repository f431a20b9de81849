"""latent_ndm.malloc: with glibc keeping freed memory, a freed 64 MiB buffer is reused without page faults."""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc settings")

# Touch a 64 MiB tensor, free it, touch a new one: the second one's minor page faults tell whether the memory
# came back from the process's heap (a few) or from the kernel, faulted in page by page (one per 4 KiB).
_CHILD = """
import json, resource, torch
from latent_ndm.malloc import keep_freed_memory
kept = keep_freed_memory()
torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1.0)
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
_PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def _run(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**environ, **env}, check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults() -> None:
    assert ctypes.util.find_library("c")
    kept = _run()
    assert kept["kept"] is True
    assert kept["faults"] < 0.05 * _PAGES, kept
    default = _run(LATENT_NDM_KEEP_FREED_MEMORY="0")
    assert default["kept"] is False
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[always]" not in thp.read_text():
        # glibc's default: above its mmap threshold (at most 32 MiB) each buffer is a fresh mmap.
        assert default["faults"] > 0.5 * _PAGES, default


def test_the_users_malloc_settings_win() -> None:
    assert _run(MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert _run(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")["kept"] is False
