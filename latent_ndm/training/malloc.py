"""Keep freed memory in the process on Linux/glibc, so CPU training steps stop paying page faults.

A training step allocates and frees the same large activations every step. glibc serves allocations above
its mmap threshold (128 KiB, adapted up to 32 MiB at most) with fresh mmaps and returns freed heap tops to
the system, so each step faults its activations in again (tens of thousands of minor faults per step of a
CIFAR-size model). Raising the mmap threshold and the trim threshold keeps that memory for reuse; the
measured fault counts and step times are in docs/RESULTS.md. The cost is that RSS no longer falls after a
peak.

The entry points `latent_ndm.cli` and `latent_ndm.experiments.benchmark` call `keep_freed_memory()` once at start. It
leaves glibc alone with LATENT_NDM_KEEP_FREED_MEMORY=0 (for side-by-side timings), when the user sets one of
the same four malloc parameters (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_,
MALLOC_MMAP_MAX_ or their glibc.malloc.* tunables in GLIBC_TUNABLES), when LD_PRELOAD replaces malloc
(jemalloc, tcmalloc: glibc's settings would not reach it), and where there is no glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
_PARAMETERS = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")
# The largest allocation served from the heap after keep_freed_memory() (0: glibc's defaults are in effect).
mmap_threshold = 0
_done = False


def _user_sets_malloc() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(f"MALLOC_{p.upper()}_" in os.environ or f"glibc.malloc.{p}" in tunables for p in _PARAMETERS)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process). Returns whether the settings are in effect."""
    global _done, mmap_threshold
    if _done:
        return mmap_threshold > 0
    _done = True
    if os.environ.get("LATENT_NDM_KEEP_FREED_MEMORY", "1") == "0" or _user_sets_malloc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        process = ctypes.CDLL(None)  # the symbols the process resolves: an LD_PRELOADed malloc comes first
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc: others' mallopt differs or is absent
        mallopt = libc.mallopt
        if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 1 GiB, so that activation-sized buffers (tens to hundreds of MB) come from the heap. Some glibc versions
    # refuse an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB); with that fallback larger buffers are still
    # re-faulted.
    for threshold in (1 << 30, 32 << 20):
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)  # never refused
            mmap_threshold = threshold
            break
    return mmap_threshold > 0
