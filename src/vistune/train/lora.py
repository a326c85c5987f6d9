"""LoRA / QLoRA through peft, the adapter run directory, and merging.

A LoRA run's ``OUTPUT_DIR/model/`` is an *adapter directory*:

    config.json                         the model's VLMConfig plus an "adapter" entry
                                        (base model directory, module modes, format)
    llm_adapter/, vision_adapter/       peft adapters (adapter_config.json + safetensors)
    non_lora_trainables.safetensors     fully trained weights (the projector, ...), under
                                        the model's own names (projector.0.weight, ...)
    tokenizer files, preprocessor_config.json

``merge_lora(run, out)`` folds the adapters into the base weights and writes a plain
vistune model directory that `vistune.load` and every other tool read.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..files import atomic_directory, write_json
from ..model.checkpoint import CONFIG_NAME, image_processor_dict, load_model, save_model
from ..model.vlm import VisionLanguageModel
from .config import ConfigError, LoraSpec

ADAPTER_FORMAT = 1
NON_LORA_FILE = "non_lora_trainables.safetensors"
ADAPTER_DIRS = {"llm": "llm_adapter", "vision": "vision_adapter"}


def wrap_lora(module: nn.Module, spec: LoraSpec, part: str) -> nn.Module:
    """Wrap an HF model with LoRA adapters; only the adapters require grad afterwards."""
    from peft import LoraConfig, get_peft_model

    if spec.bits != 16:
        quantize_for_qlora(module, spec.bits, part)
    targets = spec.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        bias="none")
    try:
        return get_peft_model(module, config)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules {spec.target_modules!r} on {part}: {e}") from None


def quantize_for_qlora(module: nn.Module, bits: int, part: str) -> None:
    """Replace the frozen linear layers by bitsandbytes 4-bit (nf4) or 8-bit ones."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"lora.bits={bits} (QLoRA) needs bitsandbytes, which is not installed: "
            "`pip install bitsandbytes`, or set lora.bits=16 for plain LoRA"
        )
    import bitsandbytes as bnb

    output = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    for name, child in list(module.named_modules()):
        for cname, lin in list(child.named_children()):
            if not isinstance(lin, nn.Linear) or lin is output:
                continue
            if bits == 4:
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            else:
                q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            q.to(lin.weight.device)  # bitsandbytes quantizes on the move to a device
            setattr(child, cname, q)


def has_lora(model: VisionLanguageModel) -> bool:
    return hasattr(model.language_model, "peft_config") or hasattr(model.vision.model, "peft_config")


# -- the adapter directory ---------------------------------------------------------
def save_adapter_run(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike,
                     base: str | os.PathLike, modes: dict[str, str]) -> Path:
    """Write a LoRA run's model directory (atomically)."""
    path = Path(path)
    cfg = model.config.to_dict()
    cfg["adapter"] = {"format": ADAPTER_FORMAT, "base": str(Path(base).resolve()), "modules": modes}
    with atomic_directory(path) as tmp:
        write_json(tmp / CONFIG_NAME, cfg)
        for part, sub in ADAPTER_DIRS.items():
            peft_model = model.language_model if part == "llm" else model.vision.model
            if hasattr(peft_model, "peft_config"):
                peft_model.save_pretrained(str(tmp / sub))
        save_file(non_lora_state(model), str(tmp / NON_LORA_FILE), metadata={"format": "pt"})
        write_json(tmp / "preprocessor_config.json", image_processor_dict(model.config.image))
        tokenizer.save_pretrained(str(tmp))
    return path


def non_lora_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Trainable weights outside the adapters, plus the projector, under merged-model names."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        if p.requires_grad or name.startswith("projector."):
            out[_merged_name(name)] = p.detach().contiguous().cpu()
    return out


def _merged_name(name: str) -> str:
    # peft inserts "base_model.model." after the wrapped module's own name.
    return name.replace("base_model.model.", "", 1)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG_NAME
    return cfg.exists() and "adapter" in json.loads(cfg.read_text())


def find_adapter_dir(run: str | os.PathLike) -> Path:
    """A run directory or its model/ directory -> the adapter directory."""
    run = Path(run)
    for cand in (run, run / "model"):
        if is_adapter_dir(cand):
            return cand
    if (run / CONFIG_NAME).exists() or (run / "model" / CONFIG_NAME).exists():
        raise ValueError(f"{run} is a plain model directory (no LoRA adapters): nothing to merge")
    raise FileNotFoundError(f"no LoRA run found at {run} (expected config.json with an 'adapter' entry)")


def load_adapter_model(run: str | os.PathLike) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """A LoRA run's model with its adapters attached (not merged)."""
    from peft import PeftModel

    path = find_adapter_dir(run)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    info = cfg["adapter"]
    if info.get("format", 1) > ADAPTER_FORMAT:
        raise ValueError(f"{path}: adapter format {info['format']} is newer than this vistune reads")
    base = Path(info["base"])
    if not base.exists():
        raise FileNotFoundError(f"{path}: base model directory {base} is missing (the adapters apply to it)")
    model, _ = load_model(base)
    from ..model.config import VLMConfig

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
    targets = {_merged_name(n): p for n, p in model.named_parameters()}
    unknown = [k for k in state if k not in targets]
    if unknown:
        raise ValueError(f"{path / NON_LORA_FILE}: unknown weights {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            targets[k].copy_(v)
    from ..text.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    model.eval()
    return model, tok


def merge_lora(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Fold the adapters of a LoRA run into its base; write a plain model directory."""
    model, tok = load_adapter_model(run)
    merged = merge_model(model)
    return save_model(merged, tok, out)


def merge_model(model: VisionLanguageModel) -> VisionLanguageModel:
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    if hasattr(model.vision.model, "merge_and_unload"):
        model.vision.model = model.vision.model.merge_and_unload()
    return model
