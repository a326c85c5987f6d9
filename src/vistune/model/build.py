"""Build a VisionLanguageModel from local pretrained paths or from tiny configs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .. import __version__
from ..data.anyres import feature_side
from ..data.images import CLIP_MEAN, CLIP_STD, ImageConfig
from ..data.settings import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE
from ..text.templates import get_template
from ..text.tokenizer import ensure_special_tokens, image_token_id, load_tokenizer
from .config import VLMConfig
from .blip2 import blip2_qformer_spec, load_blip2_qformer
from .connectors import spec_for
from .vision import VisionTower, load_vision_model
from .vlm import VisionLanguageModel

Source = str | os.PathLike | dict | PretrainedConfig


def text_config_from_dict(d: dict) -> PretrainedConfig:
    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("text config needs a 'model_type' (e.g. llama, qwen2, gpt2)")
    return AutoConfig.for_model(model_type, **d)


def load_language_model(source: Source, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM from a local directory (any AutoModelForCausalLM) or from a config."""
    if isinstance(source, dict):
        return AutoModelForCausalLM.from_config(text_config_from_dict(source))
    if isinstance(source, PretrainedConfig):
        return AutoModelForCausalLM.from_config(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"language model path does not exist: {path}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _preprocessor(source: Source) -> dict:
    if isinstance(source, (str, os.PathLike)):
        pp = Path(source) / "preprocessor_config.json"
        if pp.exists():
            return json.loads(pp.read_text())
    return {}


def _preprocessor_size(pp: dict) -> int | None:
    """Input resolution named by an HF image-processor config, if any."""
    crop, size = pp.get("crop_size"), pp.get("size")
    for v in (crop, size):
        if isinstance(v, dict):
            v = v.get("height") or v.get("shortest_edge")
        if isinstance(v, int):
            return v
    return None


def _image_config(pp: dict, size: int, aspect: str, grid_pinpoints=None, max_tiles: int | None = None) -> ImageConfig:
    mean = tuple(pp.get("image_mean", CLIP_MEAN))
    std = tuple(pp.get("image_std", CLIP_STD))
    return ImageConfig(size=size, aspect=aspect, mean=mean, std=std, grid_pinpoints=grid_pinpoints,
                       max_tiles=max_tiles)


def image_config_for(source: Source, tower: VisionTower, aspect: str = "pad") -> ImageConfig:
    """Image settings of a vision checkpoint (its preprocessor_config.json when present)."""
    return _image_config(_preprocessor(source), tower.image_size, aspect)


def build_vlm(
    vision: Source,
    llm: Source,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    *,
    projector_type: str = "mlp2x_gelu",
    connector: str | None = None,
    num_queries: int = 32,
    connector_options: dict | None = None,
    connector_from: str | os.PathLike | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select: str = "patch",
    template: str | dict = DEFAULT_TEMPLATE,
    image: ImageConfig | None = None,
    image_aspect: str = "pad",
    image_grid_pinpoints: list | str | None = None,
    max_tiles: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    dtype: torch.dtype | None = None,
) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """Assemble vision tower + new projector + LM, and a tokenizer with vistune's specials.

    ``vision`` / ``llm`` are local checkpoint directories or HF config dicts (tiny
    models from scratch). The tokenizer defaults to the one in the LLM's directory.
    The embedding matrix grows when `<image>` / `<pad>` are added, new rows
    initialised at the mean of the old ones. ``connector`` (qformer, resampler) puts a
    compressing connector of ``num_queries`` queries before the projector, fresh or
    (``connector_from``) the Q-Former of a BLIP-2 directory; each image is then
    ``num_queries`` tokens. ``image_aspect="anyres"`` tiles images on
    the best of ``image_grid_pinpoints`` (LLaVA-NeXT; `vistune.data.anyres`).
    """
    get_template(template)  # fail early on an unknown template
    if tokenizer is None:
        if isinstance(llm, (str, os.PathLike)):
            tokenizer = load_tokenizer(llm)
        else:
            raise ValueError("a tokenizer is needed when the LLM is built from a config")
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    else:
        ensure_special_tokens(tokenizer)
    vision_model = load_vision_model(vision, dtype)
    pp = _preprocessor(vision)
    size = image.size if image else _preprocessor_size(pp)
    tower = VisionTower(vision_model, vision_feature_layer, vision_feature_select, image_size=size)
    if connector_from is not None:
        spec = blip2_qformer_spec(connector_from, connector)
    else:
        spec = spec_for(connector, num_queries, tower.hidden_size, connector_options)
    lm = load_language_model(llm, dtype)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    lm.config.pad_token_id = tokenizer.pad_token_id
    # Special ids of the LM config must point into the (possibly new) vocabulary.
    lm.config.eos_token_id = tokenizer.eos_token_id
    lm.config.bos_token_id = tokenizer.bos_token_id
    gen = getattr(lm, "generation_config", None)
    if gen is not None:
        gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = (
            tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
    cfg = VLMConfig(
        vision=vision_model.config.to_dict(),
        text=lm.config.to_dict(),
        projector_type=projector_type,
        connector=spec,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select,
        num_image_tokens=spec["num_queries"] if spec else tower.num_tokens(),
        image_token_id=image_token_id(tokenizer),
        template=template,
        image=image or _image_config(pp, tower.image_size, image_aspect, image_grid_pinpoints, max_tiles),
        max_length=max_length,
        vistune_version=__version__,
    )
    if cfg.image.aspect == "anyres":
        feature_side(cfg.num_image_tokens)  # a square map per tile, or a clear error
    model = VisionLanguageModel(cfg, tower, lm)
    if connector_from is not None:
        load_blip2_qformer(model.connector, connector_from)
    if dtype is not None:
        model.projector.to(dtype)
        if model.connector is not None:
            model.connector.to(dtype)
    return model, tokenizer
