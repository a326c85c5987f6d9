"""The one inference engine: batched generation with a KV cache, sampling, stops, streaming.

Chat, the HTTP server, the web page and batch prediction all call `Engine`. A prompt
is rendered with the model's template by the same function that builds training
samples (`encode_conversation(..., add_generation_prompt=True)`), so what the model
sees at inference is exactly the prefix it was trained on.

A batch is left-padded and prefilled in one forward pass (images spliced in), then
decoded one token per step through the language model's own KV cache. Finished rows
leave the batch (their cache rows are dropped) so a long reply never makes the short
ones pay for it.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from PIL import Image

from ..model.checkpoint import LoadedModel, load
from ..text.encode import EncodingError, encode_conversation
from ..text.templates import IMAGE_PLACEHOLDER
from .detokenize import IncrementalDecoder, ReplyText
from .image_cache import ImageEmbedCache, image_key
from .kv_cache import preallocated_cache
from .sampling import SamplingParams, apply_repetition_penalty, make_generator, sample_row


class PromptError(ValueError):
    """A prompt cannot be generated from (bad turns, images vs placeholders, too long)."""


class PromptTooLong(PromptError):
    pass


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
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GenerationConfig: {msg}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty)


ImageInput = Image.Image | torch.Tensor  # PIL, pixels (3, H, W), or projected embeds (T, D)


@dataclass
class Prompt:
    """A conversation to continue: LLaVA turns, the last one human.

    ``images`` fill the ``<image>`` placeholders in order; with images and no
    placeholder, they go first in the first human turn (``"<image>\\n" * n``).
    An image is a PIL image, a preprocessed pixel tensor (3, H, W), or already
    projected embeddings (num_image_tokens, hidden) as a chat session caches them.
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


class Engine:
    def __init__(self, loaded: LoadedModel, image_cache_size: int = 64, preallocate_cache: bool = True):
        self.loaded = loaded
        self.preallocate_cache = preallocate_cache
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.template = loaded.template
        self.lm = self.model.language_model
        self.device = self.model.device
        cfg = self.model.config
        self.num_image_tokens = int(cfg.num_image_tokens)
        self.image_token_id = int(cfg.image_token_id)
        tok = self.tokenizer
        self.stop_string = self.template.stop_string(tok.eos_token or "</s>", tok.bos_token or "")
        self.eos_id = tok.eos_token_id
        lm_max = getattr(self.lm.config, "max_position_embeddings", None) or cfg.max_length
        self.max_context = int(min(cfg.max_length or lm_max, lm_max))
        # Never generate the image placeholder or padding: neither is text.
        self._suppress = sorted({i for i in (self.image_token_id, tok.pad_token_id)
                                 if i is not None and i != self.eos_id})
        self._suppress_t = torch.tensor(self._suppress, device=self.device, dtype=torch.long)
        self._special_ids = {t: i for t, i in zip(tok.all_special_tokens, tok.all_special_ids)}
        self._cache_kw = self.model._cache_arg()
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to encode from two threads
        self.image_cache = ImageEmbedCache(image_cache_size)

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, **kw) -> "Engine":
        return cls(load(path, device=device, dtype=dtype), **kw)

    @property
    def name(self) -> str:
        return Path(self.loaded.path).name if self.loaded.path else "vistune"

    # -- prompts ---------------------------------------------------------------
    def encode(self, prompt: Prompt) -> EncodedPrompt:
        """Render and tokenize a prompt; raises PromptError naming what is wrong."""
        turns = [dict(t) for t in prompt.turns]
        if not turns:
            raise PromptError("prompt has no turns")
        images = list(prompt.images)
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
                enc = encode_conversation(
                    self.tokenizer, self.template, turns, image_token_id=self.image_token_id,
                    num_image_tokens=self.num_image_tokens, system=prompt.system,
                    add_generation_prompt=True, check=False, record_id="prompt",
                )
        except EncodingError as e:
            raise PromptError(e.reason) from None
        if len(enc.input_ids) >= self.max_context:
            raise PromptTooLong(
                f"prompt is {len(enc.input_ids)} tokens (with {len(images)}x{self.num_image_tokens} image "
                f"tokens); the model's context is {self.max_context}"
            )
        return EncodedPrompt(enc.input_ids, images)

    def _check_image(self, i: int, im: object) -> None:
        if isinstance(im, Image.Image):
            return
        if isinstance(im, torch.Tensor):
            if im.dim() == 3:
                return
            if im.dim() == 2 and im.shape[0] == self.num_image_tokens:
                return
        shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
        raise PromptError(
            f"image {i}: expected a PIL image, pixels (3, H, W) or embeddings "
            f"({self.num_image_tokens}, hidden), got {shape}"
        )

    # -- images ----------------------------------------------------------------
    def image_embeds(self, images: Sequence[ImageInput]) -> torch.Tensor | None:
        """(n, num_image_tokens, hidden) projected embeddings; each distinct image encoded once."""
        if not images:
            return None
        out: list[torch.Tensor | None] = [None] * len(images)
        todo: list[tuple[int, object, torch.Tensor]] = []
        for i, im in enumerate(images):
            if isinstance(im, torch.Tensor) and im.dim() == 2:
                out[i] = im.to(self.device)
                continue
            key = image_key(im)
            cached = self.image_cache.get(key)
            if cached is not None:
                out[i] = cached
                continue
            pixels = self.loaded.pixels(im) if isinstance(im, Image.Image) else im
            todo.append((i, key, pixels))
        if todo:
            with torch.inference_mode():
                embeds = self.model.encode_images(torch.stack([p for _, _, p in todo]).to(self.device))
            for (i, key, _), e in zip(todo, embeds):
                self.image_cache.put(key, e)
                out[i] = e
        return torch.stack(out)  # type: ignore[arg-type]

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

    def stop_strings(self, config: GenerationConfig) -> tuple[set[int], list[str]]:
        """Stops as token ids (special tokens, EOS) and as text (everything else)."""
        ids = {self.eos_id} if self.eos_id is not None else set()
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


class _Row:
    """Book-keeping for one sequence of a batch."""

    def __init__(self, index: int, engine: Engine, prompt: EncodedPrompt, config: GenerationConfig, stream: bool):
        self.index = index
        self.params = config.sampling
        self.generator = None if self.params.greedy else make_generator(config.seed, engine.device)
        self.prompt_tokens = len(prompt.input_ids)
        self.max_new = min(config.max_new_tokens, engine.max_context - self.prompt_tokens)
        self.stop_ids, text_stops = engine.stop_strings(config)
        self.stream = stream
        needs_text = stream or bool(text_stops)
        self.decoder = IncrementalDecoder(engine.tokenizer) if needs_text else None
        self.reply = ReplyText(text_stops) if needs_text else None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False


class BatchRun:
    """One batch of prompts decoded together.

    Iterating advances one token per step and yields ``[(prompt_index, text), ...]``
    for the rows that stream; ``completions`` is filled when iteration ends.
    ``cancel(i)`` drops a row (a client went away) at the next step.
    """

    def __init__(self, engine: Engine, prompts: list[EncodedPrompt], configs: list[GenerationConfig],
                 streams: list[bool]):
        self.engine = engine
        self.prompts = prompts
        self.rows = [_Row(i, engine, p, c, s) for i, (p, c, s) in enumerate(zip(prompts, configs, streams))]
        self.completions: list[Completion | None] = [None] * len(prompts)
        self._active = list(self.rows)
        self._penalised = any(r.params.repetition_penalty != 1.0 for r in self.rows)
        self._all_greedy = all(r.params.greedy for r in self.rows)

    def cancel(self, index: int) -> None:
        self.rows[index].cancelled = True

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        if not self.rows:
            return
        logits = self._prefill()
        while True:
            tokens = self._choose(logits)
            deltas = self._advance(tokens)
            yield deltas
            if not any(r.finish_reason is None for r in self._active):
                break
            logits = self._decode(tokens)

    # -- model steps -------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self) -> torch.Tensor:
        eng, dev = self.engine, self.engine.device
        lengths = [len(p.input_ids) for p in self.prompts]
        width = max(lengths)
        pad = eng.tokenizer.pad_token_id if eng.tokenizer.pad_token_id is not None else 0
        total = width + max(r.max_new for r in self.rows)
        ids = torch.full((len(lengths), width), pad, dtype=torch.long)
        mask = torch.zeros((len(lengths), total), dtype=torch.long)
        for i, p in enumerate(self.prompts):
            ids[i, width - lengths[i]:] = torch.tensor(p.input_ids)
            mask[i, width - lengths[i]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        self._padded = min(lengths) != width
        # Left padding: positions count real tokens only, so each row sees the same
        # positions as it would alone.
        pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        self._mask = mask if self._padded else None
        self._width = width
        self._step = 0
        self._pos = pos[:, -1:]
        images = [im for p in self.prompts for im in p.images]
        embeds = eng.image_embeds(images)
        if self._penalised:
            self._history = self._fill_padding(ids, mask[:, :width])
        cache = preallocated_cache(eng.lm.config, total) if eng.preallocate_cache else None
        out = eng.model(
            input_ids=ids, attention_mask=self._mask[:, :width] if self._padded else None,
            position_ids=pos, image_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        self._cache = out.past_key_values
        return out.logits[:, -1]

    @staticmethod
    def _fill_padding(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first_real = ids.gather(1, mask.argmax(-1, keepdim=True))
        return torch.where(mask.bool(), ids, first_real)

    @torch.inference_mode()
    def _decode(self, tokens: list[int]) -> torch.Tensor:
        eng = self.engine
        self._drop_finished(tokens)
        self._step += 1
        self._pos = self._pos + 1
        ids = torch.tensor(self._next, device=eng.device).unsqueeze(1)
        mask = self._mask[:, : self._width + self._step] if self._mask is not None else None
        out = eng.lm(input_ids=ids, attention_mask=mask, position_ids=self._pos,
                     **{eng._cache_kw: self._cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _drop_finished(self, tokens: list[int]) -> None:
        keep = [j for j, r in enumerate(self._active) if r.finish_reason is None]
        self._next = [tokens[j] for j in keep]
        if len(keep) == len(self._active):
            return
        idx = torch.tensor(keep, device=self.engine.device)
        self._cache.batch_select_indices(idx)
        self._pos = self._pos[idx]
        if self._mask is not None:
            self._mask = self._mask[idx]
        if self._penalised:
            self._history = self._history[idx]
        self._active = [self._active[j] for j in keep]

    # -- choosing and book-keeping --------------------------------------------------
    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor) -> list[int]:
        eng = self.engine
        if eng._suppress:
            logits = logits.index_fill(1, eng._suppress_t, float("-inf"))
        if self._penalised:
            penalty = torch.tensor([[r.params.repetition_penalty] for r in self._active],
                                   device=logits.device, dtype=logits.dtype)
            logits = apply_repetition_penalty(logits, self._history, penalty)
        if self._all_greedy:
            tokens = logits.argmax(-1).tolist()
        else:
            tokens = [sample_row(logits[j], r.params, r.generator) for j, r in enumerate(self._active)]
        if self._penalised:
            self._history = torch.cat([self._history, torch.tensor(tokens, device=logits.device)[:, None]], 1)
        return tokens

    def _advance(self, tokens: list[int]) -> list[tuple[int, str]]:
        deltas: list[tuple[int, str]] = []
        for r, t in zip(self._active, tokens):
            r.tokens.append(t)
            if r.cancelled:
                r.finish_reason = "cancelled"
            elif t in r.stop_ids:
                r.finish_reason = "stop"
            elif r.decoder is not None and r.reply.add(r.decoder.push(t)):
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.max_new:
                r.finish_reason = "length"
            if r.finish_reason is not None:
                self._finish(r)
            if r.stream:
                piece = r.reply.pending(final=r.finish_reason is not None)
                if piece:
                    deltas.append((r.index, piece))
        return deltas

    def _finish(self, r: _Row) -> None:
        if r.reply is not None:
            if not r.reply.stopped:  # an unfinished character still belongs to the reply
                r.reply.add(r.decoder.flush())
            text = r.reply.text
        else:
            ids = r.tokens[:-1] if r.finish_reason == "stop" else r.tokens
            text = self.engine.tokenizer.decode(ids, skip_special_tokens=True).strip()
        self.completions[r.index] = Completion(text, r.prompt_tokens, len(r.tokens), r.finish_reason)
