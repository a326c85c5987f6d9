"""A LoRA run's model directory: its layout, finding it, and folding its peft adapters in.

A LoRA run's ``OUTPUT_DIR/model/`` is an *adapter directory*:

    config.json                         the model's VLMConfig plus an "adapter" entry
                                        (base model directory, module modes, format);
                                        a base inside the run is named relative to here
    llm_adapter/, vision_adapter/,      peft adapters (adapter_config.json + safetensors)
    connector_adapter/                  (the last on a Q-Former connector's Blip2QFormerModel)
    non_lora_trainables.safetensors     fully trained weights (the projector, ...), under
                                        the model's own names (projector.0.weight, ...)
    tokenizer files, preprocessor_config.json

Training writes it (`vistune.train.lora`); `vistune.load` reads it like any model
directory (`vistune.model.checkpoint`), with the adapters folded into the base weights,
so chat, serve, predict, eval and export take a LoRA run as they are.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import CONFIG_NAME
from .vlm import VisionLanguageModel

ADAPTER_FORMAT = 1
NON_LORA_FILE = "non_lora_trainables.safetensors"
ADAPTER_DIRS = {"llm": "llm_adapter", "vision": "vision_adapter", "connector": "connector_adapter"}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG_NAME
    if not cfg.exists():
        return False
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False  # no adapter directory; loading it as a model names what is wrong
    return isinstance(d, dict) and "adapter" in d


def find_adapter_dir(run: str | os.PathLike) -> Path:
    """A run directory or its model/ directory -> the adapter directory."""
    run = Path(run)
    for cand in (run, run / "model"):
        if is_adapter_dir(cand):
            return cand
    if (run / CONFIG_NAME).exists() or (run / "model" / CONFIG_NAME).exists():
        raise ValueError(f"{run} is a plain model directory (no LoRA adapters): nothing to merge")
    raise FileNotFoundError(f"no LoRA run found at {run} (expected config.json with an 'adapter' entry)")


def merged_name(name: str) -> str:
    """A parameter's name once its peft wrapper is gone (peft inserts "base_model.model.")."""
    return name.replace("base_model.model.", "", 1)


def adapter_host(model: VisionLanguageModel, part: str):
    """The Hugging Face model that LoRA wraps for ``part`` (llm, vision, connector), or None."""
    if part == "llm":
        return model.language_model
    if part == "vision":
        return model.vision.model
    return getattr(model.connector, "qformer", None)


def set_adapter_host(model: VisionLanguageModel, part: str, module) -> None:
    if part == "llm":
        model.language_model = module
    elif part == "vision":
        model.vision.model = module
    else:
        model.connector.qformer = module


def merge_adapters(model: VisionLanguageModel) -> VisionLanguageModel:
    """Fold peft adapters into the base weights (in place): a plain model again."""
    for part in ADAPTER_DIRS:
        host = adapter_host(model, part)
        if hasattr(host, "merge_and_unload"):
            set_adapter_host(model, part, host.merge_and_unload())
    return model
