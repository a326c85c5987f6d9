"""The mixed precision a run trains in, from its config and device; the autocast of a loop of its own."""
from __future__ import annotations

import torch

from .config import ConfigError


def mixed_precision(precision: str, device_type: str) -> str:
    if precision == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"  # fp32 on CPU: autocast's bf16 is opt-in (train.precision=bf16)
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision=fp16 is not supported on CPU (fp16 matmuls are ~100x slower there); "
                          "use bf16 or fp32")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def autocast(precision: str, device_type: str = "cpu") -> torch.autocast:
    """The autocast a loop outside the trainer (the demo's stage 0, a benchmark) runs its forward
    under at ``precision`` (as ``train.precision``; fp32: none)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(precision, device_type))
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
