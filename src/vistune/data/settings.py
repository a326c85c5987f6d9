"""What turns a conversation into token ids, resolved once from a model's config and passed down.

Training, inference, evaluation and data validation all encode with one `TextSettings`,
built by `text_settings_for` from the model's config (which holds the template, length
and image tokens it was trained with) and its tokenizer; a caller's template or length
replaces the model's. The defaults of a new model live here, once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from ..text.encode import Encoded, EncodingError, encode_conversation
from ..text.templates import IMAGE_PLACEHOLDER, Template, get_template
from .anyres import anyres_token_count, image_size
from .images import ImageConfig, ImageError, resolve_image_path

DEFAULT_TEMPLATE = "vicuna_v1"  # LLaVA v1 / v1.5's conversation format
DEFAULT_MAX_LENGTH = 2048  # LLaVA v1.5's model_max_length


@dataclass
class TextSettings:
    """What turns a record into token ids: shared by training, inference and eval."""

    tokenizer: PreTrainedTokenizerBase
    template: Template
    image_token_id: int
    num_image_tokens: int
    max_length: int = DEFAULT_MAX_LENGTH
    system: str | None = None
    image: ImageConfig | None = None  # anyres: each image's token count follows from its size
    max_image_tokens: int | None = None  # a sample's images together, at most (data.max_image_tokens)

    @property
    def anyres(self) -> bool:
        return self.image is not None and self.image.aspect == "anyres"

    def image_tokens(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Visual tokens of each image, from its (width, height)."""
        if not self.anyres:
            return [self.num_image_tokens] * len(sizes)
        return [anyres_token_count(s, self.image, self.num_image_tokens) for s in sizes]

    def encode(self, turns: Sequence[dict], record_id: object,
               image_sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        """One record's conversation as training encodes it (raises EncodingError naming it).
        An anyres model needs each image's (width, height), in placeholder order."""
        counts: int | list[int] = self.num_image_tokens
        if self.anyres:
            if image_sizes is None:
                raise EncodingError(record_id, "an anyres model's image token counts need the images' sizes")
            counts = self.image_tokens(image_sizes)
        if self.max_image_tokens is not None:
            n = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns if isinstance(t.get("value"), str))
            total = sum(counts) if isinstance(counts, list) else n * counts
            if total > self.max_image_tokens:
                raise EncodingError(record_id, f"its {n} image(s) take {total} image tokens, over the bound of "
                                               f"{self.max_image_tokens} per sample (data.max_image_tokens)")
        return encode_conversation(self.tokenizer, self.template, turns, image_token_id=self.image_token_id,
                                   num_image_tokens=counts, max_length=self.max_length,
                                   record_id=record_id, system=self.system)

    def encode_prompt(self, turns: Sequence[dict], system: str | None = None,
                      image_tokens: Sequence[int] | None = None) -> Encoded:
        """A prompt as inference encodes it: the same rendering as `encode`, ending in the assistant's
        turn, neither cut nor checked for a reply (raises EncodingError). ``image_tokens``: each
        image's count where they vary (anyres)."""
        counts = list(image_tokens) if image_tokens is not None and self.anyres else self.num_image_tokens
        return encode_conversation(self.tokenizer, self.template, turns, image_token_id=self.image_token_id,
                                   num_image_tokens=counts, system=system,
                                   add_generation_prompt=True, check=False, record_id="prompt")

    def record_image_sizes(self, images: Sequence[str], image_dir: str | os.PathLike | None,
                           record_id: object) -> list[tuple[int, int]] | None:
        """The (width, height) of a record's images when the model is anyres (read from their headers),
        else None; an unreadable image raises EncodingError naming the record."""
        if not self.anyres:
            return None
        max_pixels = self.image.max_pixels if self.image is not None else None
        try:
            return [image_size(resolve_image_path(p, image_dir), max_pixels) for p in images]
        except ImageError as e:
            raise EncodingError(record_id, str(e)) from None


def text_settings_for(model_config, tokenizer: PreTrainedTokenizerBase, template: str | dict | Template | None = None,
                      max_length: int | None = None, system: str | None = None,
                      max_image_tokens: int | None = None) -> TextSettings:
    """TextSettings from a model's config (its ``template``, ``max_length``, ``image_token_id`` and
    ``num_image_tokens``: a VLMConfig) and tokenizer; ``template`` / ``max_length`` replace the model's."""
    return TextSettings(
        tokenizer=tokenizer,
        template=get_template(template if template is not None else model_config.template),
        image_token_id=model_config.image_token_id,
        num_image_tokens=model_config.num_image_tokens,
        max_length=max_length or model_config.max_length,
        system=system,
        image=getattr(model_config, "image", None),  # a text-only model has no image settings
        max_image_tokens=max_image_tokens,
    )
