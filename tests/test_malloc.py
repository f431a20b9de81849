"""latent_ndm.training.malloc: with glibc keeping freed memory, repeated steps reuse their freed buffers without
page faults; the user's own malloc settings, a preloaded allocator and non-glibc systems leave glibc alone."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from latent_ndm.training import malloc

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc malloc settings")

# A step allocates activations of several sizes and frees them all, like a training step. glibc first has to
# grow its heap; after 2-4 steps, with the memory kept, a step finds it all free (0 faults, now and then
# one 16 MiB buffer's 4,096), where glibc's defaults fault most pages in again every step (one per 4 KiB
# page). "faults" sums the last 6 of 12 steps.
_MIB = (16, 24, 40, 64, 48)
_CHILD = f"""
import json, resource, sys, torch
from latent_ndm.training import malloc
kept = malloc.keep_freed_memory()
faults = []
for _ in range(12 if sys.argv[1] == "steps" else 0):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.empty(n << 18).fill_(1.0) for n in {_MIB}]
    del xs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"kept": kept, "threshold": malloc.mmap_threshold, "faults": sum(faults[-6:])}}))
"""
_PAGES = (sum(_MIB) << 20) // os.sysconf("SC_PAGE_SIZE")


def _run(steps: bool = False, **env: str) -> dict:
    """The child in an environment without anyone's malloc settings, plus `env`."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "LATENT_NDM_KEEP_FREED_MEMORY"))}
    out = subprocess.run([sys.executable, "-c", _CHILD, "steps" if steps else "flag"], env={**environ, **env},
                         check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_memory_is_reused_without_page_faults() -> None:
    kept = _run(steps=True)
    assert kept["kept"] is True
    if kept["threshold"] < max(_MIB) << 20:
        pytest.skip(f"this glibc accepts an mmap threshold of {kept['threshold']} bytes only")
    assert kept["faults"] < 0.25 * _PAGES, kept  # in 6 steps, less than a quarter of one step's pages
    default = _run(steps=True, LATENT_NDM_KEEP_FREED_MEMORY="0")
    assert default["kept"] is False and default["threshold"] == 0
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[always]" not in thp.read_text():
        # glibc's defaults: buffers above its mmap threshold (at most 32 MiB) are fresh mmaps, freed heap tops
        # go back to the system.
        assert default["faults"] > 3 * _PAGES, default  # more than half of each step's pages
        assert kept["faults"] < default["faults"] / 10


@glibc
def test_the_users_malloc_settings_win() -> None:
    assert _run(MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert _run(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")["kept"] is False
    assert _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")["kept"] is True  # a different parameter


def test_no_glibc_is_a_silent_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libc.so.6 cannot be loaded (macOS, Windows) or has no gnu_get_libc_version (musl): False, no error."""
    class Musl:
        mallopt = malloc = object()

    for cdll in (lambda name: (_ for _ in ()).throw(OSError(name)), lambda name: Musl()):
        monkeypatch.setattr(malloc, "_done", False)
        monkeypatch.setattr(malloc, "mmap_threshold", 0)
        monkeypatch.setattr(ctypes, "CDLL", cdll)
        monkeypatch.delenv("LATENT_NDM_KEEP_FREED_MEMORY", raising=False)
        assert malloc.keep_freed_memory() is False
        assert malloc.mmap_threshold == 0
