"""Put imported parts together: vision model + projector weights + LM + tokenizer.

Every importer ends here, so the rules that keep a converted model honest live in
one place: the tokenizer gets `<image>` and `<pad>` when it lacks them, the
embedding matrix grows to cover every id (new rows are the mean of the old ones:
deterministic, and never more likely than an average token), and the image token
id always points into the matrix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .. import __version__
from ..data.images import ImageConfig
from ..model.config import VLMConfig
from ..model.vision import VisionTower
from ..model.vlm import VisionLanguageModel
from ..data.settings import DEFAULT_MAX_LENGTH
from ..text.templates import get_template
from ..text.tokenizer import ensure_special_tokens, image_token_id
from .weights import InteropError, StateDict, load_exact


@dataclass
class Settings:
    """What a source checkpoint says about the model besides its weights."""

    projector_type: str
    vision_feature_layer: int
    vision_feature_select: str
    template: str | dict
    image: ImageConfig
    max_length: int = DEFAULT_MAX_LENGTH
    connector: dict = field(default_factory=dict)  # a compressing connector's spec (model/connectors.py)


@dataclass
class Imported:
    """An imported model, its tokenizer, and what the import did (for the user to read)."""

    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    kind: str
    notes: list[str] = field(default_factory=list)


def read_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint directory, as it is (specials are added by `assemble`)."""
    # AutoTokenizer also reads config.json, and warns about LLaVA's model_type it does not know.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tok, "is_fast", False):
        raise InteropError(f"{path}: tokenizer is not a fast tokenizer (vistune needs character offsets)")
    return tok


def grow_vocabulary(lm: PreTrainedModel, size: int) -> int:
    """Give ``lm`` at least ``size`` embedding rows; returns how many were added."""
    old = lm.get_input_embeddings().num_embeddings
    if size <= old:
        return 0
    lm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(dim=0, keepdim=True)
        out = lm.get_output_embeddings()
        if out is not None and out.weight is not emb:
            out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
            if getattr(out, "bias", None) is not None:
                out.bias[old:] = out.bias[:old].mean()
    return size - old


def assemble(
    settings: Settings,
    vision_model: PreTrainedModel,
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    projector: StateDict,
    *,
    source: str,
    notes: list[str],
    dtype: torch.dtype | None = None,
) -> VisionLanguageModel:
    """A VisionLanguageModel from parts; the projector weights are loaded exactly."""
    get_template(settings.template)
    added = ensure_special_tokens(tokenizer)
    if added:
        notes.append(f"tokenizer: added {added} special token(s) (<image>/<pad>), now {len(tokenizer)} tokens")
    grown = grow_vocabulary(lm, len(tokenizer))
    if grown:
        notes.append(f"embeddings: {grown} new row(s) (mean of the existing rows)")
    rows = lm.get_input_embeddings().num_embeddings
    img_id = image_token_id(tokenizer)
    for name, tid in (("<image>", img_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None and tid >= rows:
            raise InteropError(f"{source}: token {name} has id {tid} but the embedding matrix has {rows} rows")
    lm.config.pad_token_id = tokenizer.pad_token_id
    tower = VisionTower(vision_model, settings.vision_feature_layer, settings.vision_feature_select)
    cfg = VLMConfig(
        vision=vision_model.config.to_dict(),
        text=lm.config.to_dict(),
        projector_type=settings.projector_type,
        connector=settings.connector,
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select=settings.vision_feature_select,
        num_image_tokens=0,
        image_token_id=img_id,
        template=settings.template,
        image=settings.image,
        max_length=settings.max_length,
        vistune_version=__version__,
    )
    model = VisionLanguageModel(cfg, tower, lm)
    load_exact(model.projector, projector, f"{source} (projector)")
    if dtype is not None:
        model.to(dtype)
    cfg.num_image_tokens = settings.connector["num_queries"] if settings.connector else tower.num_tokens()
    return model.eval()
