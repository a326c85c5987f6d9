"""Checkpoint interop: original LLaVA, llava-hf and MiniGPT-4 in, llava-hf and GGUF (llama.cpp) out.

    import_checkpoint(src, out, ...)  any supported checkpoint -> a vistune model directory
    export_checkpoint(model, out)     a vistune model directory -> a llava-hf directory
    export_checkpoint(model, out, format="gguf", outtype="f16")
                                      -> the LLM and mmproj GGUF files llama.cpp runs

Formats, key mappings and the serving command: docs/interop.md.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .assemble import Imported
from .detect import FORMATS, LLAVA_FULL, LLAVA_HF, LLAVA_LORA, LLAVA_PROJECTOR, VISTUNE, detect_format, resolve_format
from .weights import InteropError, UnsafeCheckpointError, read_weights

__all__ = [
    "EXPORT_FORMATS", "FORMATS", "Imported", "InteropError", "UnsafeCheckpointError", "detect_format",
    "export_checkpoint", "import_checkpoint", "load_foreign", "read_weights",
]


def load_foreign(src: str | os.PathLike, *, source: str | None = None, vision_tower: str | os.PathLike | None = None,
                 base: str | os.PathLike | None = None, template: str | None = None,
                 dtype: torch.dtype | None = None, blip2: str | os.PathLike | None = None) -> Imported:
    """Read a foreign checkpoint into memory as a vistune model (``source``: llava | llava-hf | minigpt4 | None).

    MiniGPT-4 is named, never detected (its .pth is one layer): ``blip2`` and ``base`` give the rest.
    """
    if source == "minigpt4":
        from .minigpt4 import import_minigpt4

        return import_minigpt4(src, blip2=blip2, llm=base, template=template, dtype=dtype)
    fmt = resolve_format(src, source)
    if fmt == VISTUNE:
        raise InteropError(f"{src}: already a vistune model; load it with vistune.load")
    if fmt == LLAVA_HF:
        from .llava_hf import import_llava_hf

        return import_llava_hf(src, template=template, dtype=dtype)
    from .llava_original import import_llava_full, import_llava_lora, import_llava_projector

    if fmt == LLAVA_FULL:
        return import_llava_full(src, vision_tower=vision_tower, template=template, dtype=dtype)
    if fmt == LLAVA_PROJECTOR:
        return import_llava_projector(src, base=base, vision_tower=vision_tower, template=template, dtype=dtype)
    assert fmt == LLAVA_LORA
    return import_llava_lora(src, base=base, vision_tower=vision_tower, template=template, dtype=dtype)


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, **kwargs) -> Imported:
    """Convert ``src`` and save it as a vistune model directory at ``out`` (atomically)."""
    from ..model.checkpoint import save_model

    imported = load_foreign(src, **kwargs)
    save_model(imported.model, imported.tokenizer, out)
    return imported


EXPORT_FORMATS = ("llava-hf", "gguf")


def export_checkpoint(model: str | os.PathLike, out: str | os.PathLike, *, format: str = "llava-hf",
                      key_layout: str = "old", max_shard_size: str | int = "5GB", outtype: str = "f16"):
    """Write the vistune model directory (or LoRA run, merged) ``model`` as ``format`` at ``out``.

    llava-hf: returns the directory; gguf: returns a `GgufExport` (the two files and notes).
    """
    if format not in EXPORT_FORMATS:
        raise InteropError(f"unknown export format {format!r}; vistune exports {', '.join(EXPORT_FORMATS)}")
    if format == "gguf":
        from .gguf import export_gguf
        from .gguf_tensors import check_outtype

        check_outtype(outtype)
        vlm, tok = load_for_export(model)
        return export_gguf(vlm, tok, out, outtype=outtype, name=export_name(model))
    from .llava_hf import export_llava_hf

    vlm, tok = load_for_export(model)
    return export_llava_hf(vlm, tok, out, key_layout=key_layout, max_shard_size=max_shard_size)


def export_name(path: str | os.PathLike) -> str:
    """A model's name for the files it is exported to: its directory (a run's, for ``RUN/model``)."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "model" else p.name


def load_for_export(path: str | os.PathLike):
    """A vistune model directory as stored (`load_vistune_exact`), or a LoRA run with its adapters merged."""
    from ..model.adapters import is_adapter_dir
    from ..model.checkpoint import load_model

    path = Path(path)
    for cand in (path, path / "model"):
        if is_adapter_dir(cand):
            return load_model(cand)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"  # a full-training run directory
    return load_vistune_exact(path)


def load_vistune_exact(path: str | os.PathLike):
    """A vistune model directory with every tensor in its stored dtype (no upcast to float32)."""
    from ..model.checkpoint import WEIGHTS_NAME, model_from_config, read_config
    from ..text.tokenizer import load_tokenizer
    from .weights import load_exact

    path = Path(path)
    model = model_from_config(read_config(path), init=False)
    load_exact(model, read_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
    return model.eval(), load_tokenizer(path)
