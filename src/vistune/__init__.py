"""vistune: visual instruction tuning (the LLaVA method), from data to serving."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, device="cpu", dtype=None):
    """Load a vistune model directory; returns a `LoadedModel` (model, tokenizer, settings). A plain
    Hugging Face causal LM directory gives a `LoadedTextModel` (text only, its own chat template)."""
    from .model.checkpoint import load as _load

    return _load(path, device=device, dtype=dtype)
