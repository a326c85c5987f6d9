"""A conversation with a model: turns, attached images, streaming replies.

Each attached image goes through the vision tower and projector once; the session
keeps its projected embeddings and hands them to the engine on every later turn.
When the conversation outgrows the context, its oldest exchanges that hold no image
are dropped (`dropped_turns` counts them), so a long chat goes on instead of failing.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from PIL import Image

from ..data.images import open_image
from ..text.templates import IMAGE_PLACEHOLDER
from .engine import EncodedPrompt, Engine, GenerationConfig, Prompt, PromptTooLong

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
        self.dropped_turns = 0  # exchanges dropped to fit the context

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

    def _drop_oldest(self) -> bool:
        """Drop the oldest exchange that holds no image; False when there is none."""
        for i in range(0, len(self.turns) - 1, 2):
            pair = self.turns[i:i + 2]
            if not any(IMAGE_PLACEHOLDER in str(t["value"]) for t in pair):
                del self.turns[i:i + 2]
                self.dropped_turns += 1
                return True
        return False

    def _fit(self, text: str, config: GenerationConfig) -> tuple[EncodedPrompt, dict]:
        """The prompt for ``text``, dropping the oldest exchanges until it leaves room for a reply."""
        room = min(config.max_new_tokens, self.engine.max_context // 4)
        while True:
            prompt, human = self._prompt(text)
            try:
                encoded = self.engine.encode(prompt)
                if len(encoded.input_ids) + room <= self.engine.max_context or not self._drop_oldest():
                    return encoded, human
            except PromptTooLong:
                if not self._drop_oldest():
                    raise

    def stream(self, text: str, config: GenerationConfig | None = None) -> Iterator[str]:
        """Send a message; yields the reply in pieces and records the exchange at the end (a reply
        stopped early, by Ctrl-C or a closed page, as far as it went)."""
        config = config or self.config
        encoded, human = self._fit(text, config)  # refuse bad input before recording anything
        pieces: list[str] = []
        try:
            for piece in self.streamer(encoded, config):
                pieces.append(piece)
                yield piece
        finally:
            self._record(human, "".join(pieces))

    def _record(self, human: dict, reply: str) -> None:
        if not reply:
            return  # an empty reply cannot be rendered as a turn; the images stay attached
        if not self.engine.template.single_turn:
            self.turns += [human, {"from": "gpt", "value": reply}]
            self.image_embeds += self.pending
        self.pending = []

    def ask(self, text: str, config: GenerationConfig | None = None) -> str:
        return "".join(self.stream(text, config))
