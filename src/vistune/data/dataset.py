"""Records -> training samples (input_ids, labels, pixel_values), read lazily."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..text.encode import EncodingError
from .anyres import anyres_max_tokens, tile_image
from .images import ImageConfig, ImageError, load_pixels, open_image, resolve_image_path
from .settings import TextSettings, text_settings_for  # noqa: F401  (text_settings_for: re-exported)
from .records import Record, RecordError, RecordFile


def image_pixels(path: str | os.PathLike, cfg: ImageConfig) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """One image as its tower reads it: (1, 3, S, S) pixels, or with ``anyres`` its (1 + tiles, 3, S, S)
    tiles and its (width, height), from which the tile grid follows."""
    if cfg.aspect != "anyres":
        return load_pixels(path, cfg).unsqueeze(0), None
    tiles = tile_image(open_image(path, cfg.max_pixels), cfg)
    return tiles.pixels, tiles.size


class SampleError(ValueError):
    """A record could not become a sample; ``record_id`` names it."""

    def __init__(self, record_id: str, reason: str):
        self.record_id = record_id
        self.reason = reason
        super().__init__(f"record {record_id!r}: {reason}")


@dataclass(frozen=True)
class EncodedRecord:
    """A record as training reads it, before any image is opened."""

    id: str
    images: list[str]
    input_ids: torch.Tensor
    labels: torch.Tensor
    cut: int = 0  # tokens truncation took off its end (max_length)
    image_sizes: tuple[tuple[int, int], ...] | None = None  # anyres: what the image token counts came from


class VLDataset(Dataset):
    """A LLaVA data file as a torch Dataset; each item is one encoded sample.

    Bad records raise SampleError naming the record, so the training loop can log
    and skip them (or stop past a threshold) instead of crashing or training on
    nothing.
    """

    def __init__(
        self,
        records: Sequence[Record] | RecordFile | str | os.PathLike,
        text: TextSettings,
        image_dir: str | os.PathLike | None,
        image_config: ImageConfig,
        cache_tokens: bool = False,
    ):
        self.records = RecordFile(records) if isinstance(records, (str, os.PathLike)) else records
        self.text = text
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.image_config = image_config
        # Encoding a record (parse, template, tokenizer) is not free; a small set trained for many
        # epochs pays it again each epoch, a visible share of a small model's CPU step.
        self._tokens: dict[int, EncodedRecord] | None = {} if cache_tokens else None

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> Record:
        try:
            return self.records[i]
        except RecordError as e:
            raise SampleError(e.record_id, e.reason) from None

    def tokens(self, i: int) -> EncodedRecord:
        """Record ``i`` encoded: its id, image paths, input ids and labels.

        With ``cache_tokens``, kept after the first time (the collators copy them into
        their batches and change nothing in place). A bad record raises SampleError each
        time and is never kept.
        """
        if self._tokens is not None and i in self._tokens:
            return self._tokens[i]
        rec = self.record(i)
        try:
            sizes = self.text.record_image_sizes(rec.images, self.image_dir, rec.id)
            enc = self.text.encode(rec.conversations, rec.id, sizes)
        except EncodingError as e:
            raise SampleError(rec.id, e.reason) from None
        out = EncodedRecord(rec.id, rec.images, torch.tensor(enc.input_ids, dtype=torch.long),
                            torch.tensor(enc.labels, dtype=torch.long), enc.cut,
                            tuple(sizes) if sizes is not None else None)
        if self._tokens is not None:
            self._tokens[i] = out
        return out

    def __getitem__(self, i: int) -> dict:
        t = self.tokens(i)
        pixels = sizes = None
        if t.images:
            try:
                read = [image_pixels(resolve_image_path(p, self.image_dir), self.image_config) for p in t.images]
            except ImageError as e:
                raise SampleError(t.id, str(e)) from None
            pixels = torch.cat([px for px, _ in read])
            if self.image_config.aspect == "anyres":
                decoded = tuple(size for _, size in read)
                if t.image_sizes is not None and decoded != t.image_sizes:
                    raise SampleError(t.id, f"its images decode at {list(decoded)}, their headers "
                                            f"say {list(t.image_sizes)}")
                sizes = torch.tensor(decoded, dtype=torch.long)
        return {
            "id": t.id,
            "index": i,
            "input_ids": t.input_ids,
            "labels": t.labels,
            "cut": t.cut,
            "pixel_values": pixels,
            "image_sizes": sizes,  # anyres: each image's (width, height); its tiles follow from it
            "image_paths": t.images,
        }

    def unreadable_records(self) -> list[dict]:
        """The records that fail to parse (broken JSON, not UTF-8, not the LLaVA format), as
        ``{"id", "reason", "index"}``: found without opening an image or running the tokenizer."""
        out = []
        for i in range(len(self)):
            try:
                self.record(i)
            except SampleError as e:
                out.append({"id": e.record_id, "reason": e.reason, "index": i})
        return out

    def modality_lengths(self) -> list[int]:
        """Cheap length estimates (words + image tokens), negative for text-only samples.

        The sign carries the modality, as LLaVA's `group_by_modality_length` expects. An anyres
        image counts its most tokens (no image is opened for an estimate).
        """
        per_image = self.text.num_image_tokens
        if self.text.anyres:
            per_image = anyres_max_tokens(self.text.image, per_image)
        out = []
        for i in range(len(self)):
            try:
                rec = self.records[i]
            except RecordError:
                out.append(0)
                continue
            words = sum(len(t["value"].split()) for t in rec.conversations)
            n = int(words * 1.3) + len(rec.images) * per_image
            out.append(n if rec.images else -n)
        return out

