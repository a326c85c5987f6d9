"""Stage-1 data: image-caption pairs as single-turn LLaVA records.

Each record asks for a brief description, in a phrasing drawn at random from
`BRIEF_INSTRUCTIONS`, and answers with a caption. By default one caption is drawn per
image, as LLaVA's stage-1 sets have it (the projector learns to align images with
text; more captions of the same image add little and cost steps); ``all_captions``
makes one record per caption instead.

Records: ``{"id", "image", "kind": "caption", "conversations"}``; ids are the image id
(one per image) or ``{image_id}-{k}`` (every caption).
"""
from __future__ import annotations

import logging
import random
from typing import Sequence

from ..text.templates import IMAGE_PLACEHOLDER
from .annotations import ImageAnnotation
from .instructions import BRIEF_INSTRUCTIONS

log = logging.getLogger(__name__)


def _human(instruction: str, rng: random.Random) -> str:
    # Either side, so the model does not learn that the image always comes first.
    return f"{IMAGE_PLACEHOLDER}\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n{IMAGE_PLACEHOLDER}"


def caption_record(rid: str, ann: ImageAnnotation, caption: str, rng: random.Random) -> dict:
    return {
        "id": rid,
        "image": ann.file,
        "kind": "caption",
        "conversations": [
            {"from": "human", "value": _human(rng.choice(BRIEF_INSTRUCTIONS), rng)},
            {"from": "gpt", "value": caption},
        ],
    }


def make_pairs(annotations: Sequence[ImageAnnotation], seed: int = 0, all_captions: bool = False) -> list[dict]:
    """Stage-1 records for `annotations`; images without captions are skipped (and logged)."""
    out: list[dict] = []
    missing = []
    for ann in annotations:
        captions = [c.strip() for c in ann.captions if c.strip()]
        if not captions:
            missing.append(ann.id)
            continue
        # One generator per image: the record for an image does not change when others
        # are added to or removed from the file.
        rng = random.Random(f"{seed}/{ann.id}/caption")
        if all_captions:
            out.extend(caption_record(f"{ann.id}-{k}", ann, c, rng) for k, c in enumerate(captions))
        else:
            out.append(caption_record(ann.id, ann, rng.choice(captions), rng))
    if missing:
        log.warning("%d image(s) have no caption and were skipped (first: %s)", len(missing), ", ".join(missing[:5]))
    return out
