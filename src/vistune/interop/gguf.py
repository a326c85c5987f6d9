"""GGUF export: a vistune model as the two files llama.cpp runs (``llama-mtmd-cli``,
``llama-server --mmproj``, and what builds on them: Ollama, LM Studio).

    OUT/model-<outtype>.gguf     the language model, its tokenizer and chat template (gguf_llm)
    OUT/mmproj-<outtype>.gguf    vision tower, projector and image settings (gguf_mmproj)

Both parts are checked before anything is written; a model llama.cpp cannot run
(a ResNet tower, an LLM family it lacks, a three-layer projector) is refused with one
line naming the part and what is supported. The directory appears whole or not at all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..files import atomic_directory
from ..model.vlm import VisionLanguageModel
from .gguf_llm import plan_llm, write_llm
from .gguf_mmproj import plan_mmproj, write_mmproj
from .gguf_tensors import check_outtype, require_gguf


@dataclass
class GgufExport:
    llm: Path
    mmproj: Path
    notes: list[str] = field(default_factory=list)


def gguf_file_names(outtype: str) -> tuple[str, str]:
    return f"model-{outtype}.gguf", f"mmproj-{outtype}.gguf"


def export_gguf(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, out: str | os.PathLike, *,
                outtype: str = "f16", name: str | None = None) -> GgufExport:
    """Write ``model`` as an LLM GGUF and an mmproj GGUF in the directory ``out`` (atomically)."""
    check_outtype(outtype)
    require_gguf()
    mm = plan_mmproj(model)
    llm = plan_llm(model, tokenizer)
    name = name or Path(out).name
    llm_name, mm_name = gguf_file_names(outtype)
    with atomic_directory(out) as tmp:
        write_llm(llm, tmp / llm_name, outtype, name)
        write_mmproj(model, mm, tmp / mm_name, outtype, name)
    out = Path(out)
    return GgufExport(out / llm_name, out / mm_name, llm.notes + mm.notes)
