"""Packing: several samples in one row, each blind to the others.

Each sample keeps its own position ids (0, 1, ... restarting per sample), and the
attention mask is left as ``None``: transformers (>= 4.50, and 5.x) then detects the
sample boundaries from the position ids and builds a block-diagonal causal mask for
SDPA / eager attention, or variable-length kernels for flash-attention. The loss is
the same as without packing; only the padding (and its compute) goes away.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.unwrap import unwrap_peft
from ..text.encode import IGNORE_INDEX


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: as few rows as fit ``capacity`` tokens, filled evenly.

    Rows are padded to the fullest one, so even fills waste least: with R rows, the
    samples go longest first to the emptiest row; R starts at total / capacity and
    grows until every row fits. A sample longer than ``capacity`` (already cut to
    max_length by preprocessing) widens the limit to its own length. Within a row,
    samples keep their batch order, so images stay in the order the model fills them.
    """
    if not lengths:
        return []
    capacity = max(capacity, max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_rows = max(1, -(-sum(lengths) // capacity))
    while True:
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        fill = [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=fill.__getitem__)
            rows[r].append(i)
            fill[r] += lengths[i]
        if max(fill) <= capacity:
            return [sorted(r) for r in rows if r]
        n_rows += 1


@dataclass
class PackCollator:
    """Packs a batch of samples into as few rows as fit ``capacity`` tokens each."""

    pad_token_id: int
    capacity: int

    def __call__(self, samples: list[dict]) -> dict:
        lengths = [len(s["input_ids"]) for s in samples]
        rows = pack_rows(lengths, self.capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        R = len(rows)
        input_ids = torch.full((R, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((R, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((R, width), dtype=torch.long)
        order: list[int] = []
        segments: list[tuple[int, int, int]] = []  # (row, start, length) per sample, in `order`
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s, n = samples[i], lengths[i]
                input_ids[r, at:at + n] = s["input_ids"]
                lab = s["labels"].clone()
                lab[0] = IGNORE_INDEX  # the previous sample's last token must not predict this one
                labels[r, at:at + n] = lab
                position_ids[r, at:at + n] = torch.arange(n)
                segments.append((r, at, n))
                at += n
                order.append(i)
            # Trailing padding is a pseudo-sequence of its own (positions restart), so no
            # real token attends to it and it attends to nothing real.
            position_ids[r, at:] = torch.arange(width - at)
        batch = {
            "input_ids": input_ids,
            "attention_mask": None,
            "position_ids": position_ids,
            "labels": labels,
            "ids": [samples[i].get("id") for i in order],
            "segments": segments,
            "num_tokens": int(sum(lengths)),
        }
        for key in ("pixel_values", "image_sizes", "vision_features"):
            parts = [samples[i][key] for i in order if samples[i].get(key) is not None]
            batch[key] = torch.cat(parts) if parts else None
        return batch


# -- attention over packed rows ------------------------------------------------------------
# SDPA with the dense block-diagonal mask computes every query against every key of the
# row and only then masks: a row of 8 packed samples costs 8x the attention FLOPs it
# needs. This attention runs SDPA (causal, no mask) on each sample's span instead, so
# packed rows cost what the samples cost. Unpacked inputs (padding masks, generation
# with a cache) go to plain SDPA unchanged. On GPUs, flash-attention's varlen kernels do
# the same from the position ids, and are kept when the model uses them.
PACKED_ATTENTION = "vistune_packed"


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    if position_ids is None or kwargs.get("cache") is not None or key.shape[2] != q_len or q_len == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    position_ids = position_ids.expand(query.shape[0], -1)
    seq_ids = find_packed_sequence_indices(position_ids)
    if seq_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    kw = {k: v for k, v in kwargs.items() if k not in ("position_ids", "is_causal")}
    rows = []
    for b in range(query.shape[0]):
        starts = (torch.diff(seq_ids[b], prepend=seq_ids[b, :1] - 1) != 0).nonzero().flatten().tolist() + [q_len]
        parts = [
            sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                   None, dropout, scaling, is_causal=True, **kw)[0]
            for s, e in zip(starts[:-1], starts[1:])
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def use_packed_attention(language_model) -> str | None:
    """Switch an LM from SDPA / eager to per-sample attention for packed rows.

    Returns the implementation it replaced (to restore before saving), or None when
    the model keeps its own (flash-attention handles packed rows itself).
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    base = unwrap_peft(language_model)
    current = base.config._attn_implementation
    if current not in ("sdpa", "eager"):
        return None
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return current
