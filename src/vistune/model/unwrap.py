"""The model a peft wrapper holds: what reads or changes an LM's config and layers works on."""
from __future__ import annotations

from torch import nn


def unwrap_peft(module: nn.Module) -> nn.Module:
    """``module``'s base model when peft wraps it (LoRA), else ``module`` itself."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module
