"""Detailed descriptions of images by a vistune model: MiniGPT-4's first curation step.

Each image is asked for a detailed description; a reply shorter than ``min_tokens`` is asked
to go on ("Continue", in the same conversation) up to ``max_continues`` times, as MiniGPT-4
extended descriptions under 80 tokens. Images go through the engine in batches; each
description is appended to the output JSONL as its batch ends (``{"id", "image",
"description", "tokens", "continues"}``), and a rerun skips the ids already there.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..instruct.llm import OutputLog
from .engine import Engine
from .types import GenerationConfig, Prompt

log = logging.getLogger(__name__)

# MiniGPT-4's prompts for its stage-1 model (arXiv 2304.10592, section 3.2).
DESCRIBE_PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_PROMPT = "Continue"


@dataclass
class DescribeSummary:
    images: int = 0
    skipped: int = 0  # already in the output
    written: int = 0
    continued: int = 0  # descriptions that needed at least one "Continue"
    unreadable: list[str] | None = None


def describe_images(engine: Engine, images: Sequence[tuple[str, str | os.PathLike]], out_path: str | os.PathLike,
                    *, root: str | os.PathLike | None = None, batch_size: int = 8, min_tokens: int = 80,
                    max_continues: int = 1, max_new_tokens: int = 256,
                    prompt: str = DESCRIBE_PROMPT) -> DescribeSummary:
    """Describe every (id, image file) not yet in ``out_path``; the files are relative to ``root``."""
    if batch_size < 1 or max_continues < 0 or min_tokens < 0:
        raise ValueError("batch_size must be >= 1, max_continues and min_tokens >= 0")
    summary = DescribeSummary(images=len(images), unreadable=[])
    out = OutputLog(out_path)
    try:
        todo = [(i, f) for i, f in images if i not in out.done]
        summary.skipped = len(images) - len(todo)
        config = GenerationConfig(max_new_tokens=max_new_tokens)
        for start in range(0, len(todo), batch_size):
            batch = []
            for rid, file in todo[start:start + batch_size]:
                try:
                    with Image.open(Path(root or ".") / file) as im:
                        batch.append((rid, file, im.convert("RGB")))
                except OSError as e:
                    log.warning("image %s (%s) cannot be read: %s", rid, file, e)
                    summary.unreadable.append(str(file))
            for rec in describe_batch(engine, batch, config, min_tokens, max_continues, prompt):
                out.append(rec)
                summary.written += 1
                summary.continued += int(rec["continues"] > 0)
    finally:
        out.close()
    return summary


def describe_batch(engine: Engine, batch: list[tuple[str, str, Image.Image]], config: GenerationConfig,
                   min_tokens: int, max_continues: int, prompt: str) -> list[dict]:
    """One batch: the first replies together, then the short ones continued together."""
    turns = [[{"from": "human", "value": f"<image>\n{prompt}"}] for _ in batch]
    parts: list[list[str]] = [[] for _ in batch]
    tokens = [0] * len(batch)
    active = list(range(len(batch)))
    for round_ in range(max_continues + 1):
        if not active:
            break
        done = engine.generate([Prompt(turns[i], [batch[i][2]]) for i in active], config)
        still = []
        for i, c in zip(active, done):
            text = c.text.strip()
            if text:
                parts[i].append(text)
                tokens[i] += c.completion_tokens
            if text and tokens[i] < min_tokens and round_ < max_continues:
                turns[i] = turns[i] + [{"from": "gpt", "value": text}, {"from": "human", "value": CONTINUE_PROMPT}]
                still.append(i)
        active = still
    return [{"id": rid, "image": str(file), "description": " ".join(parts[i]), "tokens": tokens[i],
             "continues": len(parts[i]) - 1 if parts[i] else 0}
            for i, (rid, file, _) in enumerate(batch)]
