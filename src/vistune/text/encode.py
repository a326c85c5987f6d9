"""The one preprocessing function: conversation -> input_ids and labels.

Labels come from the rendered character spans (see `templates.render`), mapped onto
tokens through the fast tokenizer's offsets: a token is supervised when it overlaps
an assistant reply or its stop sequence. No substring re-tokenization, no magic
offsets, so it works the same for every template and every tokenizer. A self-check
decodes the supervised tokens and compares them with the replies; a mismatch raises
an error naming the record instead of silently training on nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from .templates import IMAGE_PLACEHOLDER, Template, get_template, render

IGNORE_INDEX = -100


class EncodingError(ValueError):
    """A record cannot be turned into a training sample; the message names the record."""

    def __init__(self, record_id: object, reason: str):
        self.record_id = record_id
        self.reason = reason
        super().__init__(f"record {record_id!r}: {reason}")


class SampleTooLong(EncodingError):
    pass


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    text: str
    cut: int = 0  # tokens dropped from the end to fit max_length (their replies go untrained)

    def __len__(self) -> int:
        return len(self.input_ids)


def _norm(s: str) -> str:
    return " ".join(s.split())


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: Template | str,
    turns: Sequence[dict],
    *,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    max_length: int | None = None,
    record_id: object = "<unnamed>",
    system: str | None = None,
    add_generation_prompt: bool = False,
    check: bool = True,
) -> Encoded:
    """Render ``turns`` with ``template``, tokenize, supervise only replies + stops.

    Every ``<image>`` placeholder becomes ``num_image_tokens`` copies of
    ``image_token_id`` (labels -100); a list gives each placeholder its own count, in order
    (AnyRes: the count depends on the image's size). Over-long samples lose text from the end; a cut
    that would land inside an image's tokens, or remove every supervised token, raises
    SampleTooLong naming the record.
    """
    tpl = get_template(template)
    try:
        rendered = render(
            tpl,
            turns,
            system=system,
            add_generation_prompt=add_generation_prompt,
            eos=tokenizer.eos_token or "</s>",
            bos=tokenizer.bos_token or "",
        )
    except ValueError as e:
        raise EncodingError(record_id, str(e)) from None
    enc = tokenizer(rendered.text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    span_tokens: list[list[int]] = [[] for _ in rendered.supervised]
    for i, (a, b) in enumerate(offsets):
        if b <= a:
            continue  # added specials (BOS) have empty offsets
        for k, (sa, sb) in enumerate(rendered.supervised):
            if a < sb and b > sa:
                labels[i] = ids[i]
                span_tokens[k].append(ids[i])
                break
    if check:
        for k, (sa, sb) in enumerate(rendered.supervised):
            want = _norm(rendered.text[sa:sb])
            got = _norm(tokenizer.decode(span_tokens[k], skip_special_tokens=False))
            if not span_tokens[k] or want not in got:
                raise EncodingError(
                    record_id,
                    f"tokenization mismatch in reply {k}: supervised tokens decode to {got!r}, "
                    f"expected {want!r}",
                )

    n_placeholders = rendered.text.count(IMAGE_PLACEHOLDER)
    n_image_ids = sum(1 for t in ids if t == image_token_id)
    if n_image_ids != n_placeholders:
        raise EncodingError(
            record_id,
            f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders in the text became "
            f"{n_image_ids} image tokens; the tokenizer must keep {IMAGE_PLACEHOLDER} as one special token",
        )
    if isinstance(num_image_tokens, int):
        counts = [num_image_tokens] * n_placeholders
    else:
        counts = [int(c) for c in num_image_tokens]
        if len(counts) != n_placeholders:
            raise EncodingError(record_id, f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(counts)} "
                                           "image token counts")
    if n_placeholders and any(c != 1 for c in counts):
        out_ids: list[int] = []
        out_labels: list[int] = []
        k = 0
        for t, lab in zip(ids, labels):
            if t == image_token_id:
                out_ids.extend([image_token_id] * counts[k])
                out_labels.extend([IGNORE_INDEX] * counts[k])
                k += 1
            else:
                out_ids.append(t)
                out_labels.append(lab)
        ids, labels = out_ids, out_labels
    else:
        labels = [IGNORE_INDEX if t == image_token_id else lab for t, lab in zip(ids, labels)]

    cut = 0
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        if image_token_id in ids[max_length:]:
            raise SampleTooLong(
                record_id,
                f"{len(ids)} tokens (with {sum(counts)} image tokens for {n_placeholders} image(s)) exceed "
                f"max_length {max_length} and truncation would cut into an image",
            )
        ids, labels = ids[:max_length], labels[:max_length]
        if not add_generation_prompt and all(lab == IGNORE_INDEX for lab in labels):
            raise SampleTooLong(
                record_id, f"truncation to max_length {max_length} removes every supervised token"
            )
    return Encoded(ids, labels, n_placeholders, rendered.text, cut)
