"""The one inference engine: batched generation with a KV cache, sampling, stops, streaming.

Chat, the HTTP server, the web page and batch prediction all call `Engine`. A prompt
is rendered with the model's `TextSettings`, which also build its training samples
(`encode_prompt` beside `encode`), so what the model sees at inference is exactly
the prefix it was trained on.

The engine turns prompts into token ids and image embeddings (each distinct image
through the vision tower once, `image_cache`); `BatchRun` (batch.py) decodes them.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Hashable, Iterator, Sequence

import torch
from PIL import Image

from ..model.causal_lm import LoadedTextModel
from ..data.anyres import Tiles, anyres_token_count
from ..model.checkpoint import LoadedModel, load
from ..text.encode import EncodingError
from ..text.hf_chat import ChatTemplateError, encode_with_chat_template
from ..data.settings import text_settings_for
from ..text.templates import IMAGE_PLACEHOLDER
from .batch import BatchRun
from .image_cache import ImageEmbedCache, image_key
from .kv_cache import preallocated_cache
from .turn_store import TurnStore
from .types import (
    Completion,
    EncodedPrompt,
    GenerationConfig,
    ImageInput,
    ImagesNotSupported,
    Prompt,
    PromptError,
    PromptTooLong,
    StoredPrefix,
)

__all__ = ["Completion", "EncodedPrompt", "Engine", "GenerationConfig", "ImageInput", "ImagesNotSupported", "Prompt",
           "PromptError", "PromptTooLong", "BatchRun"]


# Below this many tokens, a stored prefix is not worth its bookkeeping.
MIN_STORED_PREFIX = 4


class Engine:
    def __init__(self, loaded: LoadedModel | LoadedTextModel, image_cache_size: int = 64,
                 preallocate_cache: bool = True, stored_turns: int = 8, stored_turn_bytes: int = 1 << 30,
                 template: str | None = None):
        self.loaded = loaded
        self.preallocate_cache = preallocate_cache
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        # A plain causal LM: prompts rendered by its tokenizer's chat template, no images.
        self.text_only = loaded.text_only
        # Template, image tokens and length, resolved from the model's config as training resolves them;
        # ``template`` asks in another template than the model's own (a stage-1 model in a chat one, say).
        if template is None and self.text_only:
            template = loaded.template
        self.text = text_settings_for(self.model.config, self.tokenizer, template=template)
        self.template = self.text.template
        self.lm = self.model.language_model
        self.device = self.model.device
        self.anyres = self.text.anyres
        # Tokens per image, 0 where they vary with the image (anyres); every image takes at least the base ones.
        self.num_image_tokens = 0 if self.anyres else int(self.text.num_image_tokens)
        self.base_image_tokens = int(self.text.num_image_tokens)
        self.image_token_id = int(self.text.image_token_id)
        tok = self.tokenizer
        self.stop_string = self.template.stop_string(tok.eos_token or "</s>", tok.bos_token or "")
        self.eos_id = tok.eos_token_id
        self.extra_stop_ids = set(loaded.stop_token_ids)
        lm_max = getattr(self.lm.config, "max_position_embeddings", None) or self.text.max_length
        self.max_context = int(min(self.text.max_length or lm_max, lm_max))
        # No token covers more characters than the vocabulary's longest, so a text longer than
        # this cannot fit the context: refused before tokenizing it (which takes seconds per MB).
        longest = max((len(t) for t in tok.get_vocab()), default=1)
        self.max_prompt_chars = self.max_context * max(longest, 1)
        # Never generate the image placeholder or padding: neither is text.
        self._suppress = sorted({i for i in (self.image_token_id, tok.pad_token_id)
                                 if i is not None and i >= 0 and i != self.eos_id})
        self._suppress_t = torch.tensor(self._suppress, device=self.device, dtype=torch.long)
        self._special_ids = {t: i for t, i in zip(tok.all_special_tokens, tok.all_special_ids)}
        self.cache_kwarg = self.model.cache_kwarg()
        # SDPA takes a boolean (B, 1, 1, L) padding mask as it is; eager attention adds the mask, so it
        # gets the 2-D mask and transformers' own conversion.
        self.padding_mask_4d = getattr(self.lm.config, "_attn_implementation", None) == "sdpa"
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to encode from two threads
        self.image_cache = ImageEmbedCache(image_cache_size)
        self.template_prefix = self._prefill_template_prefix() if preallocate_cache else None
        # The keys and values of recent requests that ran alone (prompt and reply), one per
        # conversation: a conversation's next turn starts with them, so it prefills only what follows
        # its previous prompt.
        self.reuse_turns = preallocate_cache
        self.turns = TurnStore(stored_turns, stored_turn_bytes)

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, **kw) -> "Engine":
        return cls(load(path, device=device, dtype=dtype), **kw)

    @property
    def name(self) -> str:
        return Path(self.loaded.path).name if self.loaded.path else "vistune"

    def _prefill_template_prefix(self) -> StoredPrefix | None:
        """Keys and values of the tokens every default prompt starts with (BOS, the template's
        system prompt, the first role tag), computed once: each request then prefills only
        its own part. Found as what two different questions encode to in common, less one
        token (the tokenizer may merge across the boundary); every use checks the ids."""
        try:
            a, b = (self.encode(Prompt.ask(q)).input_ids for q in ("a", "b?"))
        except PromptError:
            return None
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n] and a[n] != self.image_token_id:
            n += 1
        ids = a[: n - 1]
        cache = preallocated_cache(self.lm.config, len(ids)) if len(ids) >= MIN_STORED_PREFIX else None
        if cache is None:
            return None
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids], device=self.device),
                       position_ids=torch.arange(len(ids), device=self.device)[None],
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        return StoredPrefix(ids, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])

    def stored_prefix_for(self, prompts: list[list[int]], images: list[torch.Tensor] | None
                          ) -> tuple[StoredPrefix, int, int] | None:
        """The stored keys and values that start every one of ``prompts`` (token ids; ``images``: each
        prompt's image embeddings) for the most tokens: (store, tokens, images), or None when
        neither the template's prefix nor (for one prompt) a stored turn covers at least
        MIN_STORED_PREFIX tokens."""
        best = None
        # a stored turn belongs to one conversation: it serves a prompt that runs alone
        turns = self.turns.recent() if self.reuse_turns and len(prompts) == 1 else []
        for stored in (self.template_prefix, *turns):
            if stored is None:
                continue
            # every row has the store's ids up to the shortest match, so its image count too
            n, n_images = min(stored.common_length(ids, images[i] if images else None, self.image_token_id,
                                                   self.num_image_tokens) for i, ids in enumerate(prompts))
            if n >= MIN_STORED_PREFIX and (best is None or n > best[1]):
                best = (stored, n, n_images)
        if best is not None:
            self.turns.touch(best[0])
        return best

    # -- prompts ---------------------------------------------------------------
    def check_size(self, n_images: int, n_chars: int) -> None:
        """Raise PromptTooLong when ``n_images`` images and ``n_chars`` characters of text can never
        fit the context, whatever the text: cheap, so callers check before decoding or tokenizing.
        A text-only model refuses any image here (ImagesNotSupported)."""
        if n_images and self.text_only:
            raise ImagesNotSupported(f"{self.name} is a text-only model: it takes no images ({n_images} given); "
                                     "send text only")
        per = self.base_image_tokens
        if n_images * per >= self.max_context:
            least = "at least " if self.anyres else ""
            raise PromptTooLong(f"{n_images} images take {least}{n_images}x{per} = "
                                f"{n_images * per} tokens; the model's context is {self.max_context}")
        if n_chars > self.max_prompt_chars:
            raise PromptTooLong(f"prompt text is {n_chars} characters, more than the model's context of "
                                f"{self.max_context} tokens can hold (at most {self.max_prompt_chars} characters)")

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        """Render and tokenize a prompt; raises PromptError naming what is wrong."""
        turns = [dict(t) for t in prompt.turns]
        if not turns:
            raise PromptError("prompt has no turns")
        images = list(prompt.images)
        self.check_size(len(images), sum(len(str(t.get("value", ""))) for t in turns) + len(prompt.system or ""))
        if self.text_only:
            try:
                with self._tok_lock:
                    ids = encode_with_chat_template(self.tokenizer, turns, prompt.system)
            except ChatTemplateError as e:
                raise PromptError(str(e)) from None
            if len(ids) >= self.max_context:
                raise PromptTooLong(f"prompt is {len(ids)} tokens; the model's context is {self.max_context}")
            return EncodedPrompt(ids, [])
        for i, im in enumerate(images):
            self._check_image(i, im)
        n_slots = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in turns)
        if images and n_slots == 0:
            first = next((t for t in turns if t.get("from", t.get("role")) in ("human", "user")), None)
            if first is None:
                raise PromptError("prompt has images but no human turn to put them in")
            first["value"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + str(first["value"])
        elif n_slots != len(images):
            raise PromptError(f"prompt has {n_slots} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
        try:
            with self._tok_lock:
                enc = self.text.encode_prompt(turns, system=prompt.system,
                                              image_tokens=self.image_token_counts(images))
        except EncodingError as e:
            raise PromptError(e.reason) from None
        if len(enc.input_ids) >= self.max_context:
            n_image = sum(self.image_token_counts(images))
            raise PromptTooLong(
                f"prompt is {len(enc.input_ids)} tokens (with {n_image} image tokens for {len(images)} "
                f"image(s)); the model's context is {self.max_context}"
            )
        return EncodedPrompt(enc.input_ids, images)

    def image_token_counts(self, images: Sequence[ImageInput]) -> list[int]:
        """Visual tokens of each image: fixed, or (anyres) from its size."""
        if not self.anyres:
            return [self.num_image_tokens] * len(images)
        cfg = self.model.config
        out = []
        for im in images:
            if isinstance(im, torch.Tensor):  # projected embeddings (checked in _check_image)
                out.append(int(im.shape[0]))
            else:
                out.append(anyres_token_count(im.size, cfg.image, self.base_image_tokens))
        return out

    def _check_image(self, i: int, im: object) -> None:
        if isinstance(im, Image.Image) or (self.anyres and isinstance(im, Tiles)):
            return
        if isinstance(im, torch.Tensor):
            if im.dim() == 3 and not self.anyres:
                return
            if im.dim() == 2 and (self.anyres or im.shape[0] == self.num_image_tokens):
                return
        shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
        if self.anyres:
            raise PromptError(f"image {i}: an anyres model takes a PIL image, its Tiles or embeddings "
                              f"(tokens, hidden), got {shape}")
        raise PromptError(
            f"image {i}: expected a PIL image, pixels (3, H, W) or embeddings "
            f"({self.num_image_tokens}, hidden), got {shape}"
        )

    # -- images ----------------------------------------------------------------
    def image_embeds(self, images: Sequence[ImageInput]) -> torch.Tensor | list[torch.Tensor] | None:
        """(n, num_image_tokens, hidden) projected embeddings (anyres: a list of (tokens_i, hidden)); each
        distinct image encoded once, also within one call (a batch of questions about one picture)."""
        if not images:
            return None
        if self.text_only:
            raise ImagesNotSupported(f"{self.name} is a text-only model: it takes no images")
        out: list[torch.Tensor | None] = [None] * len(images)
        caching = self.image_cache.capacity > 0
        todo: dict[Hashable, list[int]] = {}  # each image to encode, with the slots it fills
        pixels: list[torch.Tensor] = []
        for i, im in enumerate(images):
            if isinstance(im, torch.Tensor) and im.dim() == 2:
                out[i] = im.to(self.device)
                continue
            # Hashing pixels is not free: without a cache, only the very same object counts as the same image.
            key = image_key(im) if caching else id(im)
            cached = self.image_cache.get(key) if caching else None
            if cached is not None:
                out[i] = cached
                continue
            if key not in todo:
                todo[key] = []
                pixels.append(self.loaded.pixels(im) if isinstance(im, Image.Image) else im)
            todo[key].append(i)
        if todo:
            with torch.inference_mode():
                if self.anyres:
                    embeds = self.model.encode_images(
                        torch.cat([t.pixels for t in pixels]).to(self.device),
                        torch.tensor([t.size for t in pixels], dtype=torch.long))
                else:
                    embeds = self.model.encode_images(torch.stack(pixels).to(self.device))
            for (key, slots), e in zip(todo.items(), embeds):
                if caching:
                    self.image_cache.put(key, e)
                for i in slots:
                    out[i] = e
        return out if self.anyres else torch.stack(out)  # type: ignore[arg-type]

    # -- generation ------------------------------------------------------------
    def start(self, prompts: Sequence[Prompt | EncodedPrompt],
              config: GenerationConfig | Sequence[GenerationConfig] | None = None,
              stream: bool | Sequence[bool] = False) -> "BatchRun":
        """A batch ready to decode; iterate it for per-step text deltas (see `BatchRun`)."""
        encoded = [p if isinstance(p, EncodedPrompt) else self.encode(p) for p in prompts]
        n = len(encoded)
        configs = [config or GenerationConfig()] * n if not isinstance(config, (list, tuple)) else list(config)
        streams = [stream] * n if isinstance(stream, bool) else list(stream)
        if len(configs) != n or len(streams) != n:
            raise ValueError(f"{n} prompts but {len(configs)} configs and {len(streams)} stream flags")
        return BatchRun(self, encoded, configs, streams)

    def generate(self, prompts: Sequence[Prompt | EncodedPrompt],
                 config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> list[Completion]:
        """Complete every prompt, all in one batch."""
        if not prompts:
            return []
        run = self.start(prompts, config)
        for _ in run:
            pass
        return run.completions  # type: ignore[return-value]

    def stream(self, prompt: Prompt | EncodedPrompt, config: GenerationConfig | None = None) -> Iterator[str]:
        """The reply as text pieces (they add up to the `generate` text)."""
        run = self.start([prompt], config, stream=True)
        for deltas in run:
            for _, piece in deltas:
                yield piece

    def suppress_non_text(self, logits: torch.Tensor) -> None:
        """Rule out (in place) the tokens that are no text: the image placeholder and padding."""
        if self._suppress:
            logits.index_fill_(1, self._suppress_t, float("-inf"))  # the step's own tensor: no copy

    def stop_strings(self, config: GenerationConfig) -> tuple[set[int], list[str]]:
        """Stops as token ids (special tokens, EOS) and as text (everything else)."""
        ids = ({self.eos_id} if self.eos_id is not None else set()) | self.extra_stop_ids
        texts: list[str] = []
        for s in [self.stop_string, *config.stop]:
            if not s:
                continue
            special = self._special_ids.get(s.strip())
            if special is not None:
                ids.add(special)  # decoding skips special tokens, so match them by id
            else:
                texts.append(s)
        return ids, texts
