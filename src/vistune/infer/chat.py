"""A conversation with a model: turns, attached images, streaming replies.

Each attached image goes through the vision tower and projector once; the session
keeps its projected embeddings and hands them to the engine on every later turn.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from PIL import Image

from ..data.images import open_image
from ..text.templates import IMAGE_PLACEHOLDER
from .engine import EncodedPrompt, Engine, GenerationConfig, Prompt

Streamer = Callable[[EncodedPrompt, GenerationConfig], Iterator[str]]


class Chat:
    """``streamer`` runs the generation (default: `Engine.stream`; the web page passes
    its batcher's, so browser sessions are batched with API requests)."""

    def __init__(self, engine: Engine, system: str | None = None, config: GenerationConfig | None = None,
                 streamer: Streamer | None = None):
        self.engine = engine
        self.system = system
        self.config = config or GenerationConfig()
        self.streamer = streamer or engine.stream
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its images."""
        self.turns: list[dict] = []
        self.image_embeds: list[torch.Tensor] = []  # one per <image> already in `turns`
        self.pending: list[torch.Tensor] = []  # attached, not yet sent

    def attach(self, image: Image.Image | str | os.PathLike) -> None:
        """Attach an image (or an image file) to the next message; encoded now, once."""
        if not isinstance(image, Image.Image):
            image = open_image(image, self.engine.loaded.image_config.max_pixels)
        self.pending.append(self.engine.image_embeds([image])[0])

    def _prompt(self, text: str) -> tuple[Prompt, dict]:
        n_marked = text.count(IMAGE_PLACEHOLDER)
        if self.pending and n_marked == 0:
            text = (IMAGE_PLACEHOLDER + "\n") * len(self.pending) + text
        human = {"from": "human", "value": text}
        if self.engine.template.single_turn:
            # Templates such as `plain` render one exchange: every message stands alone.
            return Prompt([human], list(self.pending), self.system), human
        return Prompt(self.turns + [human], self.image_embeds + self.pending, self.system), human

    def stream(self, text: str, config: GenerationConfig | None = None) -> Iterator[str]:
        """Send a message; yields the reply in pieces and records the exchange at the end."""
        prompt, human = self._prompt(text)
        encoded = self.engine.encode(prompt)  # refuse bad input before touching the history
        pieces: list[str] = []
        for piece in self.streamer(encoded, config or self.config):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces)
        if not reply:
            return  # an empty reply cannot be rendered as a turn; the images stay attached
        if not self.engine.template.single_turn:
            self.turns += [human, {"from": "gpt", "value": reply}]
            self.image_embeds += self.pending
        self.pending = []

    def ask(self, text: str, config: GenerationConfig | None = None) -> str:
        return "".join(self.stream(text, config))
