"""latent_ndm.malloc: with glibc keeping freed memory, repeated steps reuse their freed buffers without page faults."""

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

# A step allocates activations of several sizes and frees them all, like a training step. glibc first has to
# grow its heap; after 2-4 steps, with the memory kept, a step finds it all free (0 faults, now and then
# one 16 MiB buffer's 4,096), where glibc's defaults fault most pages in again every step (one per 4 KiB
# page). "faults" sums the last 6 of 12 steps.
_MIB = (16, 24, 40, 64, 48)
_CHILD = f"""
import json, resource, torch
from latent_ndm.malloc import keep_freed_memory
kept = keep_freed_memory()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.empty(n << 18).fill_(1.0) for n in {_MIB}]
    del xs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"kept": kept, "faults": sum(faults[-6:])}}))
"""
_PAGES = (sum(_MIB) << 20) // os.sysconf("SC_PAGE_SIZE")


def _run(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**environ, **env}, check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults() -> None:
    assert ctypes.util.find_library("c")
    kept = _run()
    assert kept["kept"] is True
    assert kept["faults"] < 0.25 * _PAGES, kept  # in 6 steps, less than a quarter of one step's pages
    default = _run(LATENT_NDM_KEEP_FREED_MEMORY="0")
    assert default["kept"] is False
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[always]" not in thp.read_text():
        # glibc's defaults: buffers above its mmap threshold (at most 32 MiB) are fresh mmaps, freed heap tops
        # go back to the system.
        assert default["faults"] > 3 * _PAGES, default  # more than half of each step's pages


def test_the_users_malloc_settings_win() -> None:
    assert _run(MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert _run(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")["kept"] is False
