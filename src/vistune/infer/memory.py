"""Keeping freed activation memory in the process instead of handing it back to the OS.

PyTorch allocates CPU tensors with plain malloc. glibc serves blocks of a few MB
with fresh mmap pages, or returns the top of its heap to the OS as soon as enough
is free, so a batch's activations (a (8, 87, 1024) MLP tensor is 2.8 MB) come back
as new pages at every layer of every prefill, each page faulting on first touch (a
visible share of a batched prefill's time; batch 1's tensors stay small). An
inference process reuses the same sizes step after step, so it keeps them, as jemalloc or tcmalloc would: blocks up to 32 MB come
from the heap, and up to 256 MB of free heap stays mapped.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20

_done: bool | None = None


def _glibc(name: str, argtypes: list):
    """The C library's function ``name`` (returning an int), or None off Linux or where it lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Tune glibc malloc for repeated same-sized activations (once per process); False where
    the C library is not glibc (the setting is then left alone)."""
    global _done
    if _done is None:
        mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
        _done = mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def release_freed_memory() -> bool:
    """Hand the free parts of every malloc arena back to the OS (glibc ``malloc_trim``), which
    `keep_freed_memory` otherwise keeps: a server calls it when a burst is over, so its idle
    size returns near its baseline. False where the C library is not glibc."""
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    return trim is not None and bool(trim(0))


M_ARENA_MAX = -8


def one_malloc_arena() -> bool:
    """Make every thread allocate from glibc's main arena (a server: call it before threads start).

    ``malloc_trim`` shrinks only the main arena's top; memory freed at the top of a thread's
    own arena (a decoded image, the engine thread's activations) would stay with the process.
    False where the C library is not glibc."""
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))
