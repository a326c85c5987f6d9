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

from ..text.encode import IGNORE_INDEX


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, rows of at most ``capacity`` tokens.

    A sample longer than ``capacity`` gets a row of its own (it was already cut to
    max_length by preprocessing). Within a row, samples keep their batch order, so
    images stay in the order the model fills them.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        for r, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return [sorted(r) for r in rows]


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
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s, n = samples[i], lengths[i]
                input_ids[r, at:at + n] = s["input_ids"]
                lab = s["labels"].clone()
                lab[0] = IGNORE_INDEX  # the previous sample's last token must not predict this one
                labels[r, at:at + n] = lab
                position_ids[r, at:at + n] = torch.arange(n)
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
            "num_tokens": int(sum(lengths)),
        }
        for key in ("pixel_values", "vision_features"):
            parts = [samples[i][key] for i in order if samples[i].get(key) is not None]
            batch[key] = torch.cat(parts) if parts else None
        return batch
