"""LoRA / QLoRA through peft: wrapping, the adapter run directory, and merging.

A LoRA run's ``OUTPUT_DIR/model/`` is an *adapter directory* (its layout:
`vistune.model.adapters`; `vistune.model.checkpoint` reads it). `vistune.load` takes it as it is, folding
the adapters in; ``merge_lora(run, out)`` writes that merged model as a plain vistune
model directory, to ship or export without the base alongside.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..files import atomic_directory, write_json
from ..model.adapters import ADAPTER_DIRS, ADAPTER_FORMAT, NON_LORA_FILE, adapter_host, merge_adapters, merged_name
from ..model.checkpoint import CONFIG_NAME, image_processor_dict, load_adapter_model, save_model
from ..model.vlm import VisionLanguageModel
from .config import ConfigError, LoraSpec


def wrap_lora(module: nn.Module, spec: LoraSpec, part: str, compute_dtype: torch.dtype = torch.float32,
              device: torch.device | None = None) -> nn.Module:
    """Wrap an HF model with LoRA adapters; only the adapters require grad afterwards.

    With ``spec.bits`` 4 or 8 (QLoRA) the frozen linear layers are quantized first, on
    ``device``, and 4-bit layers compute in ``compute_dtype`` (the run's precision).
    """
    from peft import LoraConfig, get_peft_model

    if spec.bits != 16:
        quantize_for_qlora(module, spec.bits, part, compute_dtype, device)
    targets = spec.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        bias="none")
    try:
        return get_peft_model(module, config)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules {spec.target_modules!r} on {part}: {e}") from None


def quantize_for_qlora(module: nn.Module, bits: int, part: str, compute_dtype: torch.dtype = torch.float32,
                       device: torch.device | None = None) -> None:
    """Replace the frozen linear layers by bitsandbytes 4-bit (nf4) or 8-bit ones.

    Each layer is quantized as it moves to ``device`` (default: where it is), so a model
    built on the CPU reaches the GPU already small: a 7B LLM never sits there whole in fp32.
    """
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
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            else:
                q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            q.to(device if device is not None else lin.weight.device)  # bitsandbytes quantizes on the move
            setattr(child, cname, q)


def has_lora(model: VisionLanguageModel) -> bool:
    return any(hasattr(adapter_host(model, part), "peft_config") for part in ADAPTER_DIRS)


# -- the adapter directory ---------------------------------------------------------
def save_adapter_run(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike,
                     base: str | os.PathLike, modes: dict[str, str]) -> Path:
    """Write a LoRA run's model directory (atomically)."""
    path = Path(path)
    base = Path(base).resolve()
    run_dir = path.resolve().parent
    # A base written into the run (OUTPUT_DIR/base) is named relative to the adapters, so the
    # run can be moved or copied whole; a base elsewhere (model.from) keeps its absolute path.
    where = os.path.relpath(base, path.resolve()) if base.is_relative_to(run_dir) else str(base)
    cfg = model.config.to_dict()
    cfg["adapter"] = {"format": ADAPTER_FORMAT, "base": where, "modules": modes}
    with atomic_directory(path) as tmp:
        write_json(tmp / CONFIG_NAME, cfg)
        for part, sub in ADAPTER_DIRS.items():
            peft_model = adapter_host(model, part)
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
            out[merged_name(name)] = p.detach().contiguous().cpu()
    return out


def merge_lora(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Fold the adapters of a LoRA run into its base; write a plain model directory."""
    model, tok = load_adapter_model(run)
    return save_model(merge_adapters(model), tok, out)
