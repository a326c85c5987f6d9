"""What the machine computes fast: bf16 is native on some CPUs and emulated on others.

An emulated bf16 matmul is not a little slower, it is dozens of times slower (Muon's bf16
orthogonalisation on an AVX2-only CPU, for one). So every choice of bf16 on a CPU asks this
module first, and says why it chose what it did.

This module imports nothing from vistune, so every layer may use it.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("cpu" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def describe_machine() -> dict:
    """What a timing depends on: the CPU, its cores, torch's threads and version, native bf16.

    Machines of one CPU model name differ in speed, so a time is reported with the machine it
    was measured on.
    """
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "native_bf16": native_bf16_cpu()}


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512-BF16: bf16 matmuls are emulated under them.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, ARM ``Features``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


@lru_cache(maxsize=1)
def bf16_support() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively for torch here, and why, in a phrase.

    The CPU's flags are not enough: ``ATEN_CPU_CAPABILITY`` (avx2, default) and ``ONEDNN_MAX_CPU_ISA``
    cap the kernels torch uses, and a capped AVX-512 machine runs as an AVX2 one would.
    """
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        hw = "AMX-BF16"
    elif "avx512_bf16" in flags:
        hw = "AVX512-BF16"
    elif "bf16" in flags:  # aarch64: ARMv8.6 BF16 instructions
        hw = "ARM BF16"
    else:
        return False, "the CPU has no native bf16 (neither AVX512-BF16, AMX nor ARM BF16)"
    capability = torch.backends.cpu.get_cpu_capability()
    if hw != "ARM BF16" and capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False, f"torch's CPU kernels run at {capability} here (ATEN_CPU_CAPABILITY), below the CPU's {hw}"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa in _ONEDNN_ISAS_WITHOUT_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below the CPU's {hw}"
    return True, f"the CPU has {hw}"


def native_bf16_cpu() -> bool:
    """Whether bf16 matmuls run natively on this CPU as torch runs here (see bf16_support)."""
    return bf16_support()[0]


@lru_cache(maxsize=1)
def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with, or None where there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # no compiler on PATH (inductor raises), or an inductor without this helper
        return None


def can_compile_cpu() -> bool:
    """Whether torch.compile can build CPU kernels here: a C++ compiler and Python's C headers
    (inductor builds its kernels as Python extension modules)."""
    import sysconfig

    return cpp_compiler() is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


def bf16_on(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 matmuls on ``device`` run natively (CUDA GPUs from Ampere on, or such a CPU), and why."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"the GPU {'supports' if ok else 'does not support'} bf16"
    if device.type == "cpu":
        return bf16_support()
    return False, f"bf16 is not known to be native on {device.type}"


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls on ``device`` run natively (see bf16_on)."""
    return bf16_on(device)[0]


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, NPU): training runs there, not on the CPU."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "mps", "npu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False
