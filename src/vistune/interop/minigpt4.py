"""MiniGPT-4 in: its checkpoint + a BLIP-2 directory + a Vicuna directory -> a vistune model.

MiniGPT-4 (arXiv 2304.10592) is BLIP-2's frozen ViT, ``ln_vision``, Q-Former and 32 query tokens,
one trained linear layer (``llama_proj``), and a frozen Vicuna. Its released checkpoint
(``pretrained_minigpt4.pth``) holds that layer only, as ``{"model": {"llama_proj.weight",
"llama_proj.bias"}}``; it is read with ``torch.load(weights_only=True)``. The rest comes from

    a BLIP-2 directory in transformers' layout (``Blip2ForConditionalGeneration``): its
        ``vision_model.*`` is the tower (features of its last layer, CLS kept; its
        ``post_layernorm`` is MiniGPT-4's ``ln_vision``) and ``qformer.*`` + ``query_tokens``
        the Q-Former, as the vistune ``qformer`` connector;
    a Vicuna directory (any ``AutoModelForCausalLM`` with its tokenizer).

The model answers in MiniGPT-4's ``minigpt4`` template ('###' stops each reply); images are
resized to the tower's size with BLIP-2's normalisation.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..data.images import ImageConfig
from ..model.blip2 import blip2_qformer_spec, load_blip2_qformer, load_blip2_vision
from .assemble import Imported, Settings, assemble, read_tokenizer
from .weights import InteropError, UnsafeCheckpointError

PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")


def read_minigpt4_projection(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``llama_proj`` of a MiniGPT-4 checkpoint, as the linear projector's ``weight`` / ``bias``."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"MiniGPT-4 checkpoint not found: {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(f"{path}: refused: the pickle holds objects other than tensors ({first}); "
                                    "vistune reads it with torch.load(weights_only=True) only") from None
    except Exception as e:
        raise InteropError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise InteropError(f"{path}: expected a MiniGPT-4 checkpoint ({{'model': {{...}}}}), got {type(obj).__name__}")
    missing = [k for k in PROJ_KEYS if not isinstance(state.get(k), torch.Tensor)]
    if missing:
        raise InteropError(f"{path}: no {', '.join(missing)} (keys: {sorted(state)[:6]}); not a MiniGPT-4 checkpoint")
    return {"weight": state["llama_proj.weight"], "bias": state["llama_proj.bias"]}


def blip2_image_config(blip2: str | os.PathLike, size: int) -> ImageConfig:
    """BLIP-2's eval preprocessing: a resize to the tower's square, CLIP's mean and std unless its processor says."""
    import json

    pp = Path(blip2) / "preprocessor_config.json"
    d = json.loads(pp.read_text()) if pp.exists() else {}
    kw = {k: tuple(d[f"image_{k}"]) for k in ("mean", "std") if f"image_{k}" in d}
    return ImageConfig(size=size, aspect="resize", **kw)


def import_minigpt4(checkpoint: str | os.PathLike, *, blip2: str | os.PathLike | None,
                    llm: str | os.PathLike | None, template: str | None = None,
                    dtype: torch.dtype | None = None) -> Imported:
    if blip2 is None or llm is None:
        raise InteropError("a MiniGPT-4 import needs --blip2 (a BLIP-2 directory) and --base (the Vicuna directory)")
    notes: list[str] = []
    proj = read_minigpt4_projection(checkpoint)  # first: a wrong file fails before gigabytes load
    blip2, llm = Path(blip2), Path(llm)
    if AutoConfig.from_pretrained(str(blip2)).model_type != "blip-2":
        raise InteropError(f"--blip2 {blip2}: not a BLIP-2 checkpoint directory (model_type is not blip-2)")
    spec = blip2_qformer_spec(blip2)
    qwidth = spec["qformer"]["hidden_size"]
    if proj["weight"].shape[1] != qwidth:
        raise InteropError(f"{checkpoint}: llama_proj reads {proj['weight'].shape[1]} features but the Q-Former "
                           f"of {blip2} gives {qwidth}")
    vision = load_blip2_vision(blip2)
    lm = AutoModelForCausalLM.from_pretrained(str(llm))
    if proj["weight"].shape[0] != lm.get_input_embeddings().embedding_dim:
        raise InteropError(f"{checkpoint}: llama_proj writes {proj['weight'].shape[0]} features but {llm} is "
                           f"{lm.get_input_embeddings().embedding_dim} wide (another Vicuna size?)")
    tok = read_tokenizer(llm)
    settings = Settings(projector_type="linear", vision_feature_layer=-1, vision_feature_select="cls_patch",
                        template=template or "minigpt4", image=blip2_image_config(blip2, vision.config.image_size),
                        connector=spec)
    model = assemble(settings, vision, lm, tok, proj, source=str(checkpoint), notes=notes)
    load_blip2_qformer(model.connector, blip2)
    if dtype is not None:
        model.to(dtype)
    notes.append(f"Q-Former and {spec['num_queries']} query tokens from {blip2}; llama_proj from {checkpoint}")
    return Imported(model.eval(), tok, "minigpt4", notes)
