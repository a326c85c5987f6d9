"""Batching: padding collator (left or right)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..text.encode import IGNORE_INDEX


@dataclass
class PadCollator:
    """Pads input_ids / labels to the longest sample and concatenates images.

    ``pixel_values`` holds every image of the batch in sample order, which is the
    order in which the model fills image-token positions. Right padding for
    training, left padding for generation.
    """

    pad_token_id: int
    side: str = "right"

    def __post_init__(self) -> None:
        if self.side not in ("left", "right"):
            raise ValueError(f"padding side must be left or right, got {self.side!r}")

    def __call__(self, samples: list[dict]) -> dict:
        n = max(len(s["input_ids"]) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, n), dtype=torch.long)
        for b, s in enumerate(samples):
            L = len(s["input_ids"])
            sl = slice(n - L, n) if self.side == "left" else slice(0, L)
            input_ids[b, sl] = s["input_ids"]
            attention_mask[b, sl] = 1
            if s.get("labels") is not None:
                labels[b, sl] = s["labels"]
        pix = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        sizes = [s["image_sizes"] for s in samples if s.get("image_sizes") is not None]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(pix) if pix else None,
            "image_sizes": torch.cat(sizes) if sizes else None,  # anyres: each image's (width, height)
            "ids": [s.get("id") for s in samples],
        }
