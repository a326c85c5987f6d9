"""A plain Hugging Face causal LM (config, safetensors weights, tokenizer with a chat
template), served as it is: no vision tower, prompts rendered by its own chat template.

`TextOnlyModel` gives the LM the inference interface of `VisionLanguageModel` (a config
with image settings, ``language_model``, ``forward(input_ids=..., image_embeds=None)``),
so the one engine batches, streams and guards it like any vistune model. It takes no images.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..data.images import ImageConfig
from ..text.hf_chat import has_chat_template
from ..text.templates import Template
from .config import CONFIG_NAME
from .vlm import VLMOutput

# The prompt is the chat template's; the reply ends at the tokenizer's EOS token.
CHAT_TEMPLATE = Template(name="chat_template", stop="{eos}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Context assumed when the config names none.
DEFAULT_CONTEXT = 2048


class ImagesNotAccepted(ValueError):
    """An image was given to a model that reads text only."""


@dataclass
class TextModelConfig:
    """The image settings the engine reads, for a model without images: no image token ever matches."""

    max_length: int
    num_image_tokens: int = 0
    image_token_id: int = -1
    template: str = CHAT_TEMPLATE.name
    image: ImageConfig = field(default_factory=ImageConfig)


class TextOnlyModel(nn.Module):
    def __init__(self, language_model: PreTrainedModel):
        super().__init__()
        self.language_model = language_model
        context = getattr(language_model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        self.config = TextModelConfig(max_length=int(context))

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ImagesNotAccepted("this model reads text only: it takes no images")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                past_key_values: object | None = None, use_cache: bool = False, **lm_kwargs):
        if image_embeds is not None:
            raise ImagesNotAccepted("this model reads text only: it takes no images")
        if past_key_values is not None:
            lm_kwargs[self.cache_kwarg()] = past_key_values
        out = self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=use_cache, **lm_kwargs)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return VLMOutput(None, out.logits, cache)

    def cache_kwarg(self) -> str:
        """The name of the LM's keyword argument for its KV cache (transformers renamed it in 5.2x)."""
        params = inspect.signature(self.language_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"


@dataclass
class LoadedTextModel:
    """What inference needs of a text-only model (as `LoadedModel` for a vistune model)."""

    model: TextOnlyModel
    tokenizer: PreTrainedTokenizerBase
    path: Path | None = None
    text_only: ClassVar[bool] = True

    @property
    def config(self) -> TextModelConfig:
        return self.model.config

    @property
    def template(self) -> Template:
        return CHAT_TEMPLATE

    @property
    def image_config(self) -> ImageConfig:
        return self.config.image

    @property
    def stop_token_ids(self) -> set[int]:
        """The generation config's EOS ids (a chat model may end a turn with a token other than the tokenizer's EOS)."""
        eos = getattr(getattr(self.model.language_model, "generation_config", None), "eos_token_id", None)
        return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def pixels(self, image) -> torch.Tensor:
        raise ImagesNotAccepted("this model reads text only: it takes no images")


def _hf_config(path: Path) -> dict | None:
    try:
        d = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def looks_like_llava(d: dict) -> bool:
    """An original LLaVA or llava-hf config: `vistune import` converts those."""
    return "llava" in str(d.get("model_type", "")).lower() or "mm_vision_tower" in d or "vision_config" in d


def is_causal_lm_config(d: dict) -> bool:
    """A config of a text-only causal LM architecture transformers knows (no vision part)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return (not looks_like_llava(d) and "vision" not in d
            and str(d.get("model_type", "")) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def is_causal_lm_dir(path: str | os.PathLike) -> bool:
    d = _hf_config(Path(path))
    return d is not None and is_causal_lm_config(d)


def load_causal_lm(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> LoadedTextModel:
    """A Hugging Face causal LM directory, ready to serve; a directory that lacks a part says which.
    Only safetensors weights are read (never a pickle), and no remote code runs."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise FileNotFoundError(
            f"{path} holds a causal LM's config.json but no *.safetensors weights"
            + (f" (vistune never loads pickled weights such as {pickled[0]}; save them with "
               "save_pretrained(..., safe_serialization=True))" if pickled else ""))
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} holds a causal LM but no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not has_chat_template(tokenizer):
        raise ValueError(f"{path}: the tokenizer has no chat_template (tokenizer_config.json's 'chat_template' or "
                         "chat_template.jinja), so there is no way to render a conversation for it; a base model "
                         "without one is not a chat model")
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", use_safetensors=True,
                                              local_files_only=True, trust_remote_code=False)
    return LoadedTextModel(TextOnlyModel(lm.to(device).eval()), tokenizer, path)
