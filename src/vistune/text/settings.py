"""What turns a conversation into token ids, resolved once from a model's config and passed down.

Training, inference, evaluation and data validation all encode with one `TextSettings`,
built by `text_settings_for` from the model's config (which holds the template, length
and image tokens it was trained with) and its tokenizer; a caller's template or length
replaces the model's. The defaults of a new model live here, once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from .encode import Encoded, encode_conversation
from .templates import Template, get_template

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

    def encode(self, turns: Sequence[dict], record_id: object) -> Encoded:
        """One record's conversation as training encodes it (raises EncodingError naming it)."""
        return encode_conversation(self.tokenizer, self.template, turns, image_token_id=self.image_token_id,
                                   num_image_tokens=self.num_image_tokens, max_length=self.max_length,
                                   record_id=record_id, system=self.system)

    def encode_prompt(self, turns: Sequence[dict], system: str | None = None) -> Encoded:
        """A prompt as inference encodes it: the same rendering as `encode`, ending in the assistant's
        turn, neither cut nor checked for a reply (raises EncodingError)."""
        return encode_conversation(self.tokenizer, self.template, turns, image_token_id=self.image_token_id,
                                   num_image_tokens=self.num_image_tokens, system=system,
                                   add_generation_prompt=True, check=False, record_id="prompt")


def text_settings_for(model_config, tokenizer: PreTrainedTokenizerBase, template: str | dict | Template | None = None,
                      max_length: int | None = None, system: str | None = None) -> TextSettings:
    """TextSettings from a model's config (its ``template``, ``max_length``, ``image_token_id`` and
    ``num_image_tokens``: a VLMConfig) and tokenizer; ``template`` / ``max_length`` replace the model's."""
    return TextSettings(
        tokenizer=tokenizer,
        template=get_template(template if template is not None else model_config.template),
        image_token_id=model_config.image_token_id,
        num_image_tokens=model_config.num_image_tokens,
        max_length=max_length or model_config.max_length,
        system=system,
    )
