"""A vistune model is a directory.

    config.json               vistune version, format version, nested vision / text
                              configs, projector, feature layer, template, image settings
    model.safetensors         all weights: vision.model.*, projector.*, language_model.*
    preprocessor_config.json  image settings (CLIP-processor keys, for other tools)
    tokenizer files           tokenizer.json, tokenizer_config.json, ...

Saving writes a temporary sibling directory and renames it into place, so a crash
never leaves a half-written model where a good one was.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from .. import __version__
from ..data.anyres import Tiles, tile_image
from ..data.images import ImageConfig, preprocess
from ..files import atomic_directory, write_json
from ..text.templates import Template, get_template
from ..text.tokenizer import load_tokenizer
from .adapters import (ADAPTER_DIRS, ADAPTER_FORMAT, NON_LORA_FILE, adapter_host, find_adapter_dir, is_adapter_dir,
                       merge_adapters, merged_name, set_adapter_host)
from .build import text_config_from_dict
from .causal_lm import LoadedTextModel, is_causal_lm_dir, load_causal_lm, looks_like_llava
from .config import CONFIG_NAME, VLMConfig
from .vision import VisionTower, vision_config_from_dict
from .vlm import VisionLanguageModel

WEIGHTS_NAME = "model.safetensors"


def image_processor_dict(cfg: ImageConfig) -> dict:
    """CLIPImageProcessor-compatible settings (LLaVA's pad step is vistune's `aspect`)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": cfg.size},
        "do_center_crop": True,
        "crop_size": {"height": cfg.size, "width": cfg.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.mean),
        "image_std": list(cfg.std),
        "do_convert_rgb": True,
        "resample": 3,
        "vistune": cfg.to_dict(),
    }


def save_model(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Write a model directory atomically; returns its path."""
    path = Path(path)
    cfg = model.config
    cfg.vistune_version = __version__
    cfg.vision = model.vision.model.config.to_dict()
    cfg.text = model.language_model.config.to_dict()
    with atomic_directory(path) as tmp:
        write_json(tmp / CONFIG_NAME, cfg.to_dict())
        st_save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "vistune": __version__})
        write_json(tmp / "preprocessor_config.json", image_processor_dict(cfg.image))
        tokenizer.save_pretrained(str(tmp))
    return path


def read_config(path: str | os.PathLike) -> VLMConfig:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"not a vistune model directory nor a Hugging Face causal LM (no {CONFIG_NAME}): "
                                f"{path}")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or "vision" not in d or "text" not in d:
        if isinstance(d, dict) and looks_like_llava(d):
            raise ValueError(f"{cfg_file} is not a vistune config (no 'vision'/'text'); to use an original LLaVA "
                             "or llava-hf checkpoint, run `vistune import` first")
        kind = d.get("model_type") if isinstance(d, dict) else None
        raise ValueError(
            f"{cfg_file} is neither a vistune config (no 'vision'/'text') nor a Hugging Face causal LM's "
            f"(model_type {kind!r} is no text-generation architecture transformers knows); to use an original "
            "LLaVA or llava-hf checkpoint, run `vistune import` first"
        )
    return VLMConfig.from_dict(d)


def model_from_config(cfg: VLMConfig, *, init: bool = True) -> VisionLanguageModel:
    """An untrained model with the architecture of ``cfg``."""
    vision_cfg = vision_config_from_dict(cfg.vision)
    text_cfg = text_config_from_dict(cfg.text)
    if init:
        vision_model = AutoModel.from_config(vision_cfg)
        lm = AutoModelForCausalLM.from_config(text_cfg)
    else:
        with no_init_weights():
            vision_model = AutoModel.from_config(vision_cfg)
            lm = AutoModelForCausalLM.from_config(text_cfg)
    lm.tie_weights()
    tower = VisionTower(vision_model, cfg.vision_feature_layer, cfg.vision_feature_select, image_size=cfg.image.size)
    return VisionLanguageModel(cfg, tower, lm)


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """Load a model directory written by `save_model`, or a LoRA run's adapter directory
    (its adapters folded into the base weights). No pickle is ever read."""
    path = Path(path)
    if is_adapter_dir(path):
        model, tokenizer = load_adapter_model(path)
        model = merge_adapters(model)
        if dtype is not None:
            model.to(dtype)
        return model.to(device).eval(), tokenizer
    cfg = read_config(path)
    model = model_from_config(cfg, init=False)
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"model weights missing: {weights}")
    # Like transformers' dtype="auto": a model saved in bf16 comes back in bf16 (half the
    # memory, the very same numbers) unless the caller asks for another dtype.
    try:
        model.to(dtype or _stored_float_dtype(weights))
        missing, unexpected = st_load_model(model, str(weights), strict=False)
    except SafetensorError as e:  # truncated or not safetensors at all: say which file
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from None
    # Tied weights are stored once; anything else missing is a corrupt checkpoint.
    tied = set(_tied_names(model))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{weights}: missing keys {missing[:5]}, unexpected keys {list(unexpected)[:5]}")
    model.language_model.tie_weights()
    tokenizer = load_tokenizer(path)
    model.to(device)
    model.eval()
    return model, tokenizer


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
            set_adapter_host(model, part, PeftModel.from_pretrained(adapter_host(model, part), str(path / sub)))
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


_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _stored_float_dtype(weights: Path) -> torch.dtype:
    """The floating dtype of a safetensors file's tensors (float32 when they mix)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        found = {f.get_slice(k).get_dtype() for k in f.keys()}
    floats = {_SAFETENSORS_FLOATS[d] for d in found if d in _SAFETENSORS_FLOATS}
    return floats.pop() if len(floats) == 1 else torch.float32


def _tied_names(model: torch.nn.Module) -> list[str]:
    """Every name of a parameter that is shared by several names (tied embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [n for names in groups.values() if len(names) > 1 for n in names]


@dataclass
class LoadedModel:
    """What inference needs: the model, its tokenizer, template and image settings."""

    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    path: Path | None = None
    text_only: ClassVar[bool] = False
    stop_token_ids: ClassVar[frozenset[int]] = frozenset()  # beyond the tokenizer's EOS

    @property
    def config(self) -> VLMConfig:
        return self.model.config

    @property
    def template(self) -> Template:
        return get_template(self.config.template)

    @property
    def image_config(self) -> ImageConfig:
        return self.config.image

    def pixels(self, image) -> torch.Tensor | Tiles:
        """What the model takes of a PIL image: pixels (3, S, S), or an anyres model's tiles."""
        if self.image_config.aspect == "anyres":
            return tile_image(image, self.image_config)
        return preprocess(image, self.image_config)

    def save(self, path: str | os.PathLike) -> Path:
        return save_model(self.model, self.tokenizer, path)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
         ) -> LoadedModel | LoadedTextModel:
    """`vistune.load(path)`: a saved model ready for inference; a plain Hugging Face causal LM
    directory comes back as a `LoadedTextModel` (text only, its own chat template)."""
    if not is_adapter_dir(path) and is_causal_lm_dir(path):
        return load_causal_lm(path, device, dtype)
    model, tok = load_model(path, device, dtype)
    return LoadedModel(model, tok, Path(path))
