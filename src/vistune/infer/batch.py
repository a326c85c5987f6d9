"""One batch of sequences decoded together, one token per step.

Prompts are padded to a common length and prefilled in one forward pass (images spliced
in), then decoded through the language model's KV cache. Each row keeps its own positions
(counting real tokens only), so a row generates exactly what it would alone. A prefix
that every prompt starts with (the template's system prompt) is prefilled once and
copied to every row, and the padding goes after it, where the rows start to differ.

Rows leave as soon as they finish (their cache rows are dropped), and new prompts can
join a running batch between steps (`add`): they are prefilled on their own and their
cache is merged in, left-padded to the common length. A server thus keeps one batch
busy instead of waiting for the slowest request before starting the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .detokenize import IncrementalDecoder, ReplyText
from .kv_cache import PreallocatedLayer, preallocated_cache
from .sampling import apply_repetition_penalty, make_generator, sample_row
from .turn_store import TurnStore
from .types import Completion, EncodedPrompt, GenerationConfig, ImageInput, StoredPrefix


class BatchEngine(Protocol):
    """What a batch uses of the engine that starts it (`vistune.infer.engine.Engine`)."""

    model: nn.Module
    lm: nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_context: int
    image_token_id: int
    num_image_tokens: int
    preallocate_cache: bool
    reuse_turns: bool
    turns: TurnStore
    padding_mask_4d: bool
    cache_kwarg: str

    def stop_strings(self, config: GenerationConfig) -> tuple[set[int], list[str]]: ...

    def image_embeds(self, images: Sequence[ImageInput]) -> torch.Tensor | None: ...

    def stored_prefix_for(self, prompts: list[list[int]], images: list[torch.Tensor] | None
                          ) -> tuple[StoredPrefix, int, int] | None: ...

    def suppress_non_text(self, logits: torch.Tensor) -> None: ...


# Prefill a common prompt prefix once only when that spares at least this many token positions:
# below it, the extra forward pass costs about what it saves.
MIN_SHARED_SAVING = 48


class _Row:
    """Book-keeping for one sequence."""

    def __init__(self, index: int, engine: BatchEngine, prompt: EncodedPrompt, config: GenerationConfig,
                 stream: bool):
        self.index = index
        self.prompt: EncodedPrompt | None = prompt  # dropped after prefill
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


@dataclass
class _State:
    """Tensors of the rows being decoded, in the order of `BatchRun._active`."""

    cache: object
    mask: torch.Tensor | None  # (B, capacity) bool, True = real token; None while no row is padded
    length: int  # tokens in the cache (padding included)
    pos: torch.Tensor  # (B, 1) position of each row's last token
    history: torch.Tensor | None  # (B, T) tokens seen, for the repetition penalty


class BatchRun:
    """Iterate to advance one token per step; each step yields ``[(row_index, text), ...]``
    for the rows that stream. ``completions[i]`` is set when row ``i`` finishes;
    `take_finished` lists rows finished since it was last called. ``cancel(i)`` drops
    row ``i`` at the next step.
    """

    def __init__(self, engine: BatchEngine, prompts: list[EncodedPrompt], configs: list[GenerationConfig],
                 streams: list[bool]):
        self.engine = engine
        self.rows: list[_Row] = []
        self.completions: list[Completion | None] = []
        self._active: list[_Row] = []
        self._pending: list[_Row] = []
        self._finished: list[int] = []
        self._penalised = any(c.repetition_penalty != 1.0 for c in configs)
        self._state: _State | None = None
        # a one-row prefill: its prompt ids, image embeddings, and the stored turn it continues
        self._solo: tuple[list[int], torch.Tensor | None, StoredPrefix | None] | None = None
        self.add(prompts, configs, streams)

    # -- public ------------------------------------------------------------------
    def add(self, prompts: list[EncodedPrompt], configs: list[GenerationConfig], streams: list[bool]) -> list[int]:
        """Queue prompts to join at the next step; returns their row indices."""
        start = len(self.rows)
        for i, (p, c, s) in enumerate(zip(prompts, configs, streams)):
            row = _Row(start + i, self.engine, p, c, s)
            self.rows.append(row)
            self.completions.append(None)
            self._pending.append(row)
        return list(range(start, len(self.rows)))

    def can_join(self, config: GenerationConfig) -> bool:
        """Whether a prompt with ``config`` may be `add`-ed to this running batch."""
        merge_ok = self.engine.preallocate_cache and (self._state is None or self._state.cache is not None)
        return merge_ok and (self._penalised or config.repetition_penalty == 1.0)

    @property
    def size(self) -> int:
        """Rows still decoding or waiting to join."""
        return sum(r.finish_reason is None for r in self._active) + len(self._pending)

    @property
    def step_rows(self) -> int:
        """Rows the last step decoded together (finished rows included until the next step drops them)."""
        return len(self._active)

    def cancel(self, index: int) -> None:
        self.rows[index].cancelled = True

    def take_finished(self) -> list[int]:
        done, self._finished = self._finished, []
        return done

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        tokens: list[int] = []
        while True:
            logits = self._step(tokens)
            if logits is None:
                return
            tokens = self._choose(logits)
            yield self._advance(tokens)

    # -- one step: decode the running rows, prefill and merge the new ones ---------------
    @torch.inference_mode()
    def _step(self, tokens: list[int]) -> torch.Tensor | None:
        logits = self._decode(tokens) if tokens else None
        if self._pending:
            new, self._pending = self._pending, []
            new_state, new_logits = self._prefill(new)
            if self._active:
                self._merge(new_state, new)
                logits = torch.cat([logits, new_logits]) if logits is not None else new_logits
            else:
                self._state, logits = new_state, new_logits
            self._active += new
        return logits

    def _prefill(self, rows: list[_Row]) -> tuple[_State, torch.Tensor]:
        eng, dev = self.engine, self.engine.device
        prompts = [r.prompt.input_ids for r in rows]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        capacity = width + max(r.max_new for r in rows)
        embeds = eng.image_embeds([im for r in rows for im in r.prompt.images])
        row_embeds = _per_row(embeds, [len(r.prompt.images) for r in rows])
        for r in rows:
            r.prompt = None
        cache = preallocated_cache(eng.lm.config, capacity) if eng.preallocate_cache else None
        shared, shared_images = self._shared_prefix(prompts, row_embeds) if cache is not None else (0, 0)
        # Stored keys and values that start every prompt (the template's system prompt, or the
        # previous turn of a conversation with the same images) are copied in, not computed.
        stored, n_stored, stored_images = None, 0, 0
        found = eng.stored_prefix_for(prompts, row_embeds) if cache is not None else None
        if found is not None:
            stored, n_stored, stored_images = found
            if shared < n_stored:
                shared, shared_images = n_stored, stored_images
        # A prompt that holds all of a stored turn's prompt is that conversation's next turn (the
        # reply, re-encoded, may differ from the generated tokens from its first token on). One that
        # shares only the system prompt (or an image) with it is another conversation.
        continues = stored if stored is not None and n_stored >= stored.prompt_length > 0 else None
        # a stored turn keeps its images stacked; anyres images differ in length (and are never reused: per_image 0)
        solo_images = row_embeds[0] if row_embeds and isinstance(row_embeds[0], torch.Tensor) else None
        self._solo = (prompts[0], solo_images, continues) if len(rows) == 1 else None
        pad = eng.tokenizer.pad_token_id if eng.tokenizer.pad_token_id is not None else 0
        # A row is the shared prefix, its padding, then the rest of its prompt (plain left padding
        # when nothing is shared): the padding sits where the rows start to differ.
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.ones((len(rows), capacity), dtype=torch.bool)
        for i, p in enumerate(prompts):
            gap = width - lengths[i]
            ids[i, :shared] = torch.tensor(p[:shared])
            ids[i, shared + gap:] = torch.tensor(p[shared:])
            mask[i, shared:shared + gap] = False
        ids, mask = ids.to(dev), mask.to(dev)
        padded = min(lengths) != width
        # Positions count real tokens only: each row sees the positions it would see alone.
        pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        if shared:
            # The common prefix (system prompt, and an image every row asks about) goes through the model
            # once; every row gets a copy of its keys and values, exactly what it would have computed itself.
            # Of it, the stored part is copied in, not computed.
            if n_stored:
                for layer, (k, v) in zip(cache.layers, stored.kv):
                    layer.update(k[:, :, :n_stored], v[:, :, :n_stored])
            if shared > n_stored:
                images = row_embeds[0][stored_images:shared_images] if shared_images > stored_images else None
                eng.model(input_ids=ids[:1, n_stored:shared], position_ids=pos[:1, n_stored:shared],
                          past_key_values=cache, image_embeds=images, use_cache=True, logits_to_keep=1)
            if len(rows) > 1:
                cache.batch_repeat_interleave(len(rows))
            if shared_images:
                rest = [e[shared_images:] for e in row_embeds]
                embeds = torch.cat(rest) if any(len(e) for e in rest) else None
        out = eng.model(input_ids=ids[:, shared:], attention_mask=mask[:, :width] if padded else None,
                        position_ids=pos[:, shared:], image_embeds=embeds, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
        history = None
        if self._penalised:
            first_real = ids.gather(1, mask[:, :width].int().argmax(1, keepdim=True))
            history = torch.where(mask[:, :width], ids, first_real)
        state = _State(out.past_key_values, mask if padded else None, width, pos[:, -1:], history)
        return state, out.logits[:, -1]

    def _shared_prefix(self, prompts: list[list[int]], row_embeds: list[torch.Tensor] | None) -> tuple[int, int]:
        """(tokens, images) at the start of every prompt: the same token ids and, where they are image
        tokens, the same image in every row; a whole number of images, and at least one token of its
        own left to each row. (0, 0) when too few tokens would be saved to pay for the extra forward pass."""
        if len(prompts) < 2:
            return 0, 0
        first, image, per_image = prompts[0], self.engine.image_token_id, self.engine.num_image_tokens
        limit = min(len(p) for p in prompts) - 1
        n = n_image_tokens = 0
        while n < limit and all(p[n] == first[n] for p in prompts):
            if first[n] == image:
                if not per_image:  # image token counts vary (anyres): images are never shared
                    break
                k, starts = divmod(n_image_tokens, per_image)
                if starts == 0 and not all(torch.equal(e[k], row_embeds[0][k]) for e in row_embeds):
                    break
                n_image_tokens += 1
            n += 1
        if per_image:
            n -= n_image_tokens % per_image  # never split an image
        if n * (len(prompts) - 1) < MIN_SHARED_SAVING:
            return 0, 0
        return n, n_image_tokens // per_image if per_image else 0

    def _decode(self, tokens: list[int]) -> torch.Tensor | None:
        eng, st = self.engine, self._state
        self._drop_finished(tokens)
        if not self._active:
            return None
        st.pos = st.pos + 1
        ids = torch.tensor(self._next, device=eng.device).unsqueeze(1)
        mask = None
        if st.mask is not None:
            mask = st.mask[:, : st.length + 1]
            if eng.padding_mask_4d and isinstance(st.cache.layers[0], PreallocatedLayer):
                # Full attention in every layer: a ready (B, 1, 1, L) view spares transformers
                # rebuilding the same padding mask at every step.
                mask = mask[:, None, None]
        out = eng.lm(input_ids=ids, attention_mask=mask, position_ids=st.pos,
                     **{eng.cache_kwarg: st.cache}, use_cache=True, logits_to_keep=1)
        st.length += 1
        return out.logits[:, -1]

    def _drop_finished(self, tokens: list[int]) -> None:
        keep = [j for j, r in enumerate(self._active) if r.finish_reason is None]
        self._next = [tokens[j] for j in keep]
        if len(keep) == len(self._active):
            return
        self._active = [self._active[j] for j in keep]
        if not keep:
            self._state = None
            return
        st = self._state
        idx = torch.tensor(keep, device=self.engine.device)
        st.cache.batch_select_indices(idx)
        st.pos = st.pos[idx]
        if st.mask is not None:
            st.mask = st.mask[idx]
        if st.history is not None:
            st.history = st.history[idx]
        self._trim(st)

    @staticmethod
    def _trim(st: _State) -> None:
        """Drop columns that are padding in every remaining row (left by rows that joined
        late and have finished), so a batch that keeps taking newcomers stays short."""
        if st.mask is None or not isinstance(st.cache.layers[0], PreallocatedLayer):
            return
        lead = int((st.mask[:, : st.length].cumsum(1) == 0).all(0).sum())
        if lead == 0:
            return
        for layer in st.cache.layers:
            layer.trim_left(lead)
        st.mask = st.mask[:, lead:]
        st.length -= lead

    def _merge(self, new: _State, new_rows: list[_Row]) -> None:
        """Append the rows of ``new`` to the running state, left-padding to a common length."""
        old = self._state
        length = max(old.length, new.length)
        # Running rows feed back at most their remaining tokens, new rows at most max_new - 1.
        remaining = max(r.max_new - len(r.tokens) for r in self._active)
        capacity = length + max(remaining, max(r.max_new for r in new_rows))
        b_old = old.pos.shape[0]
        b_new = new.pos.shape[0]
        dev = old.pos.device
        for lo, ln in zip(old.cache.layers, new.cache.layers):
            if not (isinstance(lo, PreallocatedLayer) and isinstance(ln, PreallocatedLayer)):
                raise RuntimeError("only preallocated caches can be merged")
            lo.append_rows(ln, length, capacity)
        mask = torch.ones((b_old + b_new, capacity), dtype=torch.bool, device=dev)
        mask[:, :length] = False
        mask[:b_old, length - old.length:length] = old.mask[:, :old.length] if old.mask is not None else True
        mask[b_old:, length - new.length:length] = new.mask[:, :new.length] if new.mask is not None else True
        old.mask, old.length = mask, length
        old.pos = torch.cat([old.pos, new.pos])
        if old.history is not None:
            old.history = torch.cat([_pad_left(old.history, new.history.shape[1]),
                                     _pad_left(new.history, old.history.shape[1])])

    # -- choosing and book-keeping --------------------------------------------------
    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor) -> list[int]:
        eng, st = self.engine, self._state
        eng.suppress_non_text(logits)
        if st.history is not None:
            penalty = torch.tensor([[r.params.repetition_penalty] for r in self._active],
                                   device=logits.device, dtype=logits.dtype)
            logits = apply_repetition_penalty(logits, st.history, penalty)
        if all(r.params.greedy for r in self._active):
            tokens = logits.argmax(-1).tolist()
        else:
            tokens = [sample_row(logits[j], r.params, r.generator) for j, r in enumerate(self._active)]
        if st.history is not None:
            st.history = torch.cat([st.history, torch.tensor(tokens, device=logits.device)[:, None]], 1)
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
        self._finished.append(r.index)
        self._store_turn(r)

    def _store_turn(self, r: _Row) -> None:
        """Keep the keys and values of a row that ran alone, for its conversation's next turn.
        Views, not copies: once the row is dropped its cache is never written again."""
        eng, st, solo = self.engine, self._state, self._solo
        if (not eng.reuse_turns or solo is None or r.finish_reason == "cancelled" or st is None
                or self._active != [r] or self._pending or st.mask is not None
                or not isinstance(st.cache.layers[0], PreallocatedLayer)):
            return
        ids = solo[0] + r.tokens[:-1]  # the last token was chosen, not yet fed
        if len(ids) != st.length:
            return
        # The turn it started from is this conversation's earlier state: replaced, not kept beside it.
        eng.turns.add(StoredPrefix(ids, [(layer.keys, layer.values) for layer in st.cache.layers], solo[1],
                                   prompt_length=len(solo[0])), replaces=solo[2])


def _per_row(embeds: torch.Tensor | list[torch.Tensor] | None, counts: list[int]) -> list | None:
    """A batch's image embeddings split by row: stacked (N, T, D) rows, or lists of (T_i, D) (anyres)."""
    if embeds is None:
        return None
    if isinstance(embeds, torch.Tensor):
        return list(embeds.split(counts))
    out, at = [], 0
    for c in counts:
        out.append(embeds[at:at + c])
        at += c
    return out


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad token rows to ``width`` with each row's first token (harmless for the penalty)."""
    if t.shape[1] >= width:
        return t
    return torch.cat([t[:, :1].expand(-1, width - t.shape[1]), t], 1)
