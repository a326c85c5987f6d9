"""Which checkpoint format a path holds, from its files and config (never from its name).

The original LLaVA loader guesses from folder-name substrings ("llava", "lora");
vistune looks at what is there instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .weights import InteropError, weight_files

VISTUNE = "vistune"
LLAVA_HF = "llava-hf"
LLAVA_FULL = "llava"
LLAVA_PROJECTOR = "llava-projector"
LLAVA_LORA = "llava-lora"
FORMATS = (VISTUNE, LLAVA_HF, LLAVA_FULL, LLAVA_PROJECTOR, LLAVA_LORA)
# `--from` names a family; detection picks the member.
FAMILIES = {"llava": (LLAVA_FULL, LLAVA_PROJECTOR, LLAVA_LORA), "llava-hf": (LLAVA_HF,)}

_PROJECTOR_FILES = ("mm_projector.bin", "mm_projector.safetensors")


def _config(d: Path) -> dict | None:
    f = d / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise InteropError(f"{f}: not valid JSON ({e})") from None


def detect_format(src: str | os.PathLike) -> str:
    """One of FORMATS; raises InteropError saying what was found when none fits."""
    p = Path(src)
    if not p.exists():
        raise InteropError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in (".bin", ".safetensors"):
            return LLAVA_PROJECTOR
        raise InteropError(f"{p}: a single file can only be a projector (mm_projector.bin)")
    if (p / "adapter_config.json").is_file():
        return LLAVA_LORA
    cfg = _config(p)
    if cfg is None:
        if any((p / n).is_file() for n in _PROJECTOR_FILES):
            return LLAVA_PROJECTOR
        raise InteropError(f"{p}: no config.json, adapter_config.json or mm_projector.bin; not a checkpoint")
    if "vision" in cfg and "text" in cfg and "format_version" in cfg:
        return VISTUNE
    archs = cfg.get("architectures") or []
    if {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"} & set(archs) or (
        cfg.get("model_type") in ("llava", "llava_next") and ("text_config" in cfg or "vision_config" in cfg)
    ):
        return LLAVA_HF
    if "mm_vision_tower" in cfg or any(a.startswith("Llava") for a in archs) or \
            str(cfg.get("model_type", "")).startswith("llava"):
        if weight_files(p):
            return LLAVA_FULL
        if any((p / n).is_file() for n in _PROJECTOR_FILES):
            return LLAVA_PROJECTOR
        raise InteropError(f"{p}: a LLaVA config but no weights (model*.safetensors, pytorch_model*.bin "
                           "or mm_projector.bin)")
    raise InteropError(
        f"{p / 'config.json'}: model_type {cfg.get('model_type')!r}, architectures {archs}: neither an "
        "original LLaVA nor a llava-hf checkpoint"
    )


def resolve_format(src: str | os.PathLike, family: str | None) -> str:
    """Detect, and check the result against what the user said it is (``--from``)."""
    found = detect_format(src)
    if family is None:
        return found
    if family not in FAMILIES:
        raise InteropError(f"--from {family!r}: expected one of {sorted(FAMILIES)}")
    if found not in FAMILIES[family]:
        raise InteropError(f"{src}: --from {family} given, but this looks like a {found} checkpoint")
    return found
