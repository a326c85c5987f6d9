"""Process-wide settings: torch's threads, glibc's allocator, the environment.

They belong to the process, not to a model or a run, so library code (the trainer, the
engine) leaves them alone and only entry points set them: the `vistune` commands, the
demo and the server's app. Each entry point calls the function named for what it runs,
so it gets what that work was tuned with:

    training_process()   `vistune train`: on a machine without an accelerator, glibc
                         keeps freed blocks and up to 1 GiB of free heap
    inference_process()  `vistune chat` / `predict` / `eval`: glibc keeps freed blocks
                         and up to 256 MiB of free heap
    serving_process()    `vistune serve` / `web` and `create_app`: inference's setting,
                         one malloc arena (so the idle trim reaches every thread's
                         memory) and, with the web page, no gradio analytics

Why keep freed memory: PyTorch allocates CPU tensors with plain malloc, and glibc serves
blocks of a few MB with fresh mmap pages or hands the top of its heap back to the OS as
soon as enough is free, so the same activations come back as new pages at every layer of
every step, each page faulting on first touch. A process that allocates the same sizes
step after step keeps them instead, as jemalloc or tcmalloc would.

This module imports nothing from vistune at load time, so it can be loaded on its own.
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap: glibc's largest allowed value on 64-bit
TRAINING_TRIM_THRESHOLD = 1 << 30  # a training step's activations are large and come back every step
INFERENCE_TRIM_THRESHOLD = 256 << 20  # a server's batches are smaller, and its idle size should stay near baseline


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


# -- the allocator -------------------------------------------------------------------
def keep_freed_memory(trim_threshold: int) -> bool:
    """Make glibc malloc serve blocks up to 32 MiB from its heap and keep up to ``trim_threshold``
    bytes of free heap mapped, for this process from now on (as MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ in the environment would). False where the C library is not glibc
    (the setting is then left alone)."""
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def training_memory() -> bool:
    """The allocator setting of a CPU training run (up to 1 GiB of free heap kept)."""
    return keep_freed_memory(TRAINING_TRIM_THRESHOLD)


def inference_memory() -> bool:
    """The allocator setting of inference and serving (up to 256 MiB of free heap kept)."""
    return keep_freed_memory(INFERENCE_TRIM_THRESHOLD)


def release_freed_memory() -> bool:
    """Hand the free parts of every malloc arena back to the OS (glibc ``malloc_trim``), which
    `keep_freed_memory` otherwise keeps: a server calls it when a burst is over, so its idle
    size returns near its baseline. False where the C library is not glibc."""
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    return trim is not None and bool(trim(0))


def one_malloc_arena() -> bool:
    """Make every thread allocate from glibc's main arena (a server: call it before threads start).

    ``malloc_trim`` shrinks only the main arena's top; memory freed at the top of a thread's
    own arena (a decoded image, the engine thread's activations) would stay with the process.
    False where the C library is not glibc."""
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


# -- threads ---------------------------------------------------------------------------
def set_threads(n: int) -> None:
    """torch's intra-op thread count for this process, from now on."""
    torch.set_num_threads(n)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's thread count set to ``n`` for the block, and put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the environment ---------------------------------------------------------------------
def no_gradio_analytics() -> None:
    """No calls home from a local web page (unless the user's environment asks for them)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


# -- what each entry point sets ---------------------------------------------------------------
def training_process() -> bool:
    """What `vistune train` sets: on a machine without an accelerator (the run trains on the CPU),
    the training allocator setting. Returns whether the allocator was tuned."""
    from .hardware import has_accelerator

    return not has_accelerator() and training_memory()


def inference_process() -> bool:
    """What `vistune chat`, `predict` and `eval` set: the inference allocator setting, so
    that a batch's activations reuse their pages. Returns whether the allocator was tuned."""
    return inference_memory()


def serving_process(web: bool = False) -> bool:
    """What `vistune serve` / `web` and `create_app` set: one malloc arena (before the engine's
    threads start, so that the idle trim reaches what any thread freed), inference's allocator
    setting and, with ``web``, no gradio analytics. Returns whether the allocator was tuned."""
    one = one_malloc_arena()
    if web:
        no_gradio_analytics()
    return inference_memory() and one
