"""Keep freed memory in the process on Linux/glibc, so CPU training steps stop paying page faults.

A training step allocates and frees the same large activations every step. glibc serves allocations above
its mmap threshold (128 KiB, adapted up to 32 MiB at most) with fresh mmaps and returns freed heap tops to
the system, so each step faults its activations in again: ~75,000 minor faults (~300 MB) per step of the
CIFAR-size baseline, ~120,000 for NDM continuous. Raising the mmap threshold and the trim threshold keeps
that memory for reuse: 5,000-11,000 faults per step; on a 2-core Xeon NDM continuous steps 9-19% faster,
baseline steps 0-7% (docs/RESULTS.md, seventh run). The cost is that RSS no longer falls after a peak (the
peak itself moved by 1-4%).

The entry points `latent_ndm.cli` and `latent_ndm.benchmark` call `keep_freed_memory()`
once at start. It leaves glibc alone when the user has set malloc options in the environment or
LATENT_NDM_KEEP_FREED_MEMORY=0 (for side-by-side timings), and where there is no glibc (macOS, Windows,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process). Returns whether the settings are in effect
    (False without glibc, when switched off, or when the environment sets malloc options, which then win)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if (os.environ.get("LATENT_NDM_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in _USER_SETTINGS)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc: others' mallopt differs or is absent
    except (OSError, AttributeError):
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Some glibc versions refuse an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB): fall back to that.
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _done = bool(mmap_ok and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _done
