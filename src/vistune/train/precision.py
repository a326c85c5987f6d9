"""The mixed precision a run trains in, from its config and device."""
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
