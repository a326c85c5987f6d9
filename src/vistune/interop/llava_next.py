"""transformers' LLaVA-NeXT format (`LlavaNextForConditionalGeneration`): what an anyres model adds to llava-hf.

A llava-hf LLaVA-NeXT directory is a llava-hf one (`llava_hf.py`: the same tower, projector
and LM key names) plus the learned row-end embedding and the grids:

    vistune                         llava-hf old         llava-hf new (2025)
    projector.image_newline         image_newline        model.image_newline
    image.grid_pinpoints [[w, h]]   image_grid_pinpoints [[h, w]] (config.json and the image processor)

Only grids within ``max_tiles`` are written: transformers knows no such bound, and chooses
among what it is given exactly as vistune does.
"""
from __future__ import annotations

from transformers import LlavaNextConfig, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from ..data.images import ImageConfig
from ..model.anyres import NEWLINE
from ..model.vlm import VisionLanguageModel
from .weights import InteropError, StateDict

ARCHITECTURE = "LlavaNextForConditionalGeneration"
MODEL_TYPE = "llava_next"


def is_next_config(cfg: dict) -> bool:
    """Whether a config.json is llava-hf's LLaVA-NeXT."""
    return ARCHITECTURE in (cfg.get("architectures") or []) or cfg.get("model_type") == MODEL_TYPE


def hf_pinpoints(image: ImageConfig) -> list[list[int]]:
    """vistune's choosable grids (width, height) as transformers lists them (height, width)."""
    return [[h, w] for w, h in image.pinpoints]


def anyres_image_config(image: ImageConfig, hf_grid: list, source: str) -> ImageConfig:
    """``image`` (read from a processor) as the anyres settings of a NeXT checkpoint's grids."""
    try:
        grid = [[int(w), int(h)] for h, w in hf_grid]
    except (TypeError, ValueError):
        raise InteropError(f"{source}: image_grid_pinpoints {hf_grid!r} is not a list of [height, width]") from None
    d = image.to_dict() | {"aspect": "anyres", "grid_pinpoints": grid}
    try:
        return ImageConfig.from_dict(d)
    except ValueError as e:
        raise InteropError(f"{source}: {e}") from None


def newline_key(key_layout: str) -> str:
    return "model.image_newline" if key_layout == "new" else "image_newline"


def newline_weights(model: VisionLanguageModel, key_layout: str) -> StateDict:
    return {newline_key(key_layout): getattr(model.projector, NEWLINE).detach()}


def take_newline(sd: StateDict, source: str) -> StateDict:
    """Remove the row-end embedding from a NeXT checkpoint's weights; it goes with the projector's."""
    found = [k for k in ("image_newline", "model.image_newline") if k in sd]
    if len(found) != 1:
        raise InteropError(f"{source}: a LLaVA-NeXT checkpoint needs one image_newline weight, found {found}")
    return {NEWLINE: sd.pop(found[0])}


def next_config(model: VisionLanguageModel, **kwargs) -> LlavaNextConfig:
    cfg = LlavaNextConfig(image_grid_pinpoints=hf_pinpoints(model.config.image), **kwargs)
    cfg.architectures = [ARCHITECTURE]
    return cfg


def next_processor(image: ImageConfig, image_kwargs: dict, tokenizer, **kwargs) -> LlavaNextProcessor:
    """The processor: LLaVA-NeXT's tiles from the same normalisation as vistune's."""
    s = image.size
    ip = LlavaNextImageProcessorPil(
        **{k: v for k, v in image_kwargs.items() if k not in ("do_pad", "size", "crop_size", "do_center_crop")},
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_center_crop=True, do_pad=True,
        image_grid_pinpoints=hf_pinpoints(image))
    return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, **kwargs)
