"""Reading a LoRA run's model directory: its base model, the peft adapters and the
weights trained beside them (the projector, ...).

A LoRA run's ``OUTPUT_DIR/model/`` is an *adapter directory*:

    config.json                         the model's VLMConfig plus an "adapter" entry
                                        (base model directory, module modes, format);
                                        a base inside the run is named relative to here
    llm_adapter/, vision_adapter/       peft adapters (adapter_config.json + safetensors)
    non_lora_trainables.safetensors     fully trained weights (the projector, ...), under
                                        the model's own names (projector.0.weight, ...)
    tokenizer files, preprocessor_config.json

Training writes it (`vistune.train.lora`); `vistune.load` reads it like any model
directory, with the adapters folded into the base weights, so chat, serve, predict,
eval and export take a LoRA run as they are.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from ..text.tokenizer import load_tokenizer
from .checkpoint import CONFIG_NAME, load_model
from .config import VLMConfig
from .vlm import VisionLanguageModel

ADAPTER_FORMAT = 1
NON_LORA_FILE = "non_lora_trainables.safetensors"
ADAPTER_DIRS = {"llm": "llm_adapter", "vision": "vision_adapter"}


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


def load_adapter_model(run: str | os.PathLike) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """A LoRA run's model with its adapters attached, not merged (for comparison and further training)."""
    from peft import PeftModel

    path = find_adapter_dir(run)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    info = cfg["adapter"]
    if info.get("format", 1) > ADAPTER_FORMAT:
        raise ValueError(f"{path}: adapter format {info['format']} is newer than this vistune reads")
    base = path / info["base"]  # relative: inside the run (an absolute path stays as it is)
    if not base.exists():
        raise FileNotFoundError(f"{path}: base model directory {base} is missing (the adapters apply to it)")
    model, _ = load_model(base)
    own = VLMConfig.from_dict(cfg)
    model.config.template = own.template
    model.config.max_length = own.max_length
    for part, sub in ADAPTER_DIRS.items():
        if (path / sub).exists():
            if part == "llm":
                model.language_model = PeftModel.from_pretrained(model.language_model, str(path / sub))
            else:
                model.vision.model = PeftModel.from_pretrained(model.vision.model, str(path / sub))
    state = load_file(str(path / NON_LORA_FILE))
    targets = {merged_name(n): p for n, p in model.named_parameters()}
    unknown = [k for k in state if k not in targets]
    if unknown:
        raise ValueError(f"{path / NON_LORA_FILE}: unknown weights {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            targets[k].copy_(v)
    model.eval()
    return model, load_tokenizer(path)


def merge_adapters(model: VisionLanguageModel) -> VisionLanguageModel:
    """Fold peft adapters into the base weights (in place): a plain model again."""
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    if hasattr(model.vision.model, "merge_and_unload"):
        model.vision.model = model.vision.model.merge_and_unload()
    return model
