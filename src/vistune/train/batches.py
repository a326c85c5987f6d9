"""Samples -> batches for training, tolerating bad records.

A record that cannot become a sample (unreadable image, over-long text, broken
JSON) raises ``SampleError`` in the dataset. Training must not die on one bad record
among 665K, nor silently drop many: ``SkipBad`` turns the error into a marker that
the collator removes and the loop counts, logs by id, and compares with
``train.max_bad_records``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..data.collate import PadCollator
from ..data.dataset import SampleError
from ..data.settings import DEFAULT_MAX_LENGTH
from .packing import PackCollator


class SkipBad(Dataset):
    """Wraps a dataset: a SampleError becomes ``{"bad": True, "id", "reason", "index"}``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        try:
            return self.dataset[i]
        except SampleError as e:
            return {"bad": True, "id": e.record_id, "reason": e.reason, "index": i}


@dataclass
class TrainCollator:
    """Drops bad samples, then pads (or packs) the rest; carries cached features along, and names
    the samples that truncation to ``max_length`` shortened (``cut``)."""

    pad_token_id: int
    packing: bool = False
    pack_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        self._pad = PadCollator(self.pad_token_id, side="right")
        self._pack = PackCollator(self.pad_token_id, self.pack_length)

    def __call__(self, samples: list[dict]) -> dict:
        bad = [{"id": s["id"], "reason": s["reason"], "index": s["index"]} for s in samples if s.get("bad")]
        good = [s for s in samples if not s.get("bad")]
        if not good:
            return {"bad": bad, "cut": [], "num_samples": 0, "num_tokens": 0, "ids": []}
        if self.packing:
            batch = self._pack(good)
        else:
            batch = self._pad(good)
            batch["num_tokens"] = int(batch["attention_mask"].sum())
            feats = [s["vision_features"] for s in good if s.get("vision_features") is not None]
            batch["vision_features"] = torch.cat(feats) if feats else None
        batch["bad"] = bad
        batch["cut"] = [{"id": s["id"], "index": s["index"], "tokens": s["cut"]} for s in good if s.get("cut")]
        batch["num_samples"] = len(good)
        return batch


def supervised_tokens(batch: dict) -> int:
    """How many positions carry a loss (what the model's loss averages over)."""
    if not batch.get("num_samples"):
        return 0
    return int((batch["labels"][:, 1:] != -100).sum())


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The keyword arguments of VisionLanguageModel.forward for a collated batch."""
    out = {}
    for key in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_sizes",
                "vision_features"):
        v = batch.get(key)
        if v is not None:
            out[key] = v.to(device, non_blocking=True)
    return out
