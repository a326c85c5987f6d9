"""What goes into and comes out of the engine: prompts, generation settings, completions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from PIL import Image

from ..data.anyres import Tiles
from .sampling import SamplingParams

# The seeds torch.Generator.manual_seed takes: a seed outside them would fail its batch mid-run.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class PromptError(ValueError):
    """A prompt cannot be generated from (bad turns, images vs placeholders, too long)."""


class PromptTooLong(PromptError):
    pass


class ImagesNotSupported(PromptError):
    """Images given to a model that reads text only (a plain causal LM)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) for s in self.stop), "stop must be a list of strings"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, "seed must fit in 64 bits"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GenerationConfig: {msg}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty)


ImageInput = Image.Image | torch.Tensor | Tiles  # PIL, pixels (3, H, W), anyres tiles, or projected embeds (T, D)


@dataclass
class Prompt:
    """A conversation to continue: LLaVA turns, the last one human.

    ``images`` fill the ``<image>`` placeholders in order; with images and no
    placeholder, they go first in the first human turn (``"<image>\\n" * n``).
    An image is a PIL image, a preprocessed pixel tensor (3, H, W) (an anyres model: its
    `Tiles`), or already projected embeddings (tokens, hidden) as a chat session caches them.
    """

    turns: list[dict]
    images: list[ImageInput] = field(default_factory=list)
    system: str | None = None

    @classmethod
    def ask(cls, text: str, images: Sequence[ImageInput] = (), system: str | None = None) -> "Prompt":
        return cls([{"from": "human", "value": text}], list(images), system)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"] | str


@dataclass
class EncodedPrompt:
    """A prompt as token ids (image tokens expanded) plus its images in order."""

    input_ids: list[int]
    images: list[ImageInput]


@dataclass
class StoredPrefix:
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (1, heads, len(ids), head_dim)
    images: torch.Tensor | None = None  # embeddings of the images among ``ids``, in order
    prompt_length: int = 0  # a stored turn: where its prompt ends and its reply begins

    def common_length(self, ids: list[int], images: torch.Tensor | None, image_token_id: int,
                      per_image: int) -> tuple[int, int]:
        """(tokens, images) of ``ids`` whose keys and values this prefix holds: the common ids,
        where image tokens also need the same image, never part of an image, and at least one
        token of ``ids`` left to prefill. ``per_image`` 0 (counts vary, anyres): up to the first image."""
        limit = min(len(self.ids), len(ids) - 1)
        n = n_image_tokens = 0
        while n < limit and self.ids[n] == ids[n]:
            if ids[n] == image_token_id:
                if not per_image:
                    break
                k, start = divmod(n_image_tokens, per_image)
                if start == 0 and not (self.images is not None and images is not None and k < len(self.images)
                                       and k < len(images) and torch.equal(self.images[k], images[k])):
                    break
                n_image_tokens += 1
            n += 1
        if not per_image:
            return n, 0
        n -= n_image_tokens % per_image
        return n, n_image_tokens // per_image
