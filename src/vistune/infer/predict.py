"""Batch answers for a question file (the LLaVA evaluation format), resumable.

Question line: ``{"question_id": ..., "image": PATH | [PATHS] (optional), "text": ...}``
(``<image>`` placeholders optional; images go first when absent).
Answer line:   ``{"question_id": ..., "prompt": ..., "text": ..., "model": ..., "metadata": {...}}``

Answers are appended (and fsynced) batch by batch; a rerun skips the question ids
already answered, so an interrupted job loses at most one batch. A half-written
last line (the process died mid-write) is cut off before appending.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from ..data.images import ImageError, open_image, resolve_image_path
from ..files import JsonlAppender
from .engine import Engine, GenerationConfig, Prompt, PromptError


class PredictError(ValueError):
    """A question or answer file cannot be used; the message names the line or question."""


@dataclass
class Question:
    question_id: object
    text: str
    images: list[str] = field(default_factory=list)
    line: int = 0

    @property
    def key(self) -> str:
        return json.dumps(self.question_id)


def read_questions(path: str | os.PathLike) -> list[Question]:
    path = Path(path)
    if not path.exists():
        raise PredictError(f"question file not found: {path}")
    out: list[Question] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise PredictError(f"{where}: a question must be a JSON object")
            if "question_id" not in d:
                raise PredictError(f"{where}: missing 'question_id'")
            qid = d["question_id"]
            text = d.get("text")
            if not isinstance(text, str) or not text.strip():
                raise PredictError(f"{where}: question {qid!r} has no 'text'")
            image = d.get("image")
            images = [] if image is None else [image] if isinstance(image, str) else image
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise PredictError(f"{where}: question {qid!r}: 'image' must be a path or a list of paths")
            q = Question(qid, text, images, n)
            if q.key in seen:
                raise PredictError(f"{where}: question_id {qid!r} repeats line {seen[q.key]}")
            seen[q.key] = n
            out.append(q)
    return out


def answered_ids(path: str | os.PathLike) -> set[str]:
    """Question ids (as JSON) already in an answer file; cuts off a half-written last line."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    done: set[str] = set()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        qid = _answer_id(raw)
        if qid is None:
            raise PredictError(f"{path}:{n}: not an answer line; fix or remove it before resuming")
        done.add(qid)
    if tail.strip():
        qid = _answer_id(tail)
        with open(path, "r+b") as f:
            if qid is None:  # the process died while writing it
                f.truncate(len(data) - len(tail))
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                done.add(qid)
    return done


def _answer_id(raw: bytes) -> str | None:
    try:
        return json.dumps(json.loads(raw)["question_id"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class PredictStats:
    total: int
    skipped: int
    written: int


def _load_images(q: Question, image_dir: str | os.PathLike | None, max_pixels: int) -> list:
    try:
        return [open_image(resolve_image_path(p, image_dir), max_pixels) for p in q.images]
    except ImageError as e:
        raise PredictError(f"question {q.question_id!r} (line {q.line}): {e}") from None


def _batches(items: list[Question], size: int) -> Iterable[list[Question]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def predict_file(
    engine: Engine,
    questions: str | os.PathLike | list[Question],
    out: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    config: GenerationConfig | None = None,
    model_name: str | None = None,
    system: str | None = None,
    progress: bool = True,
) -> PredictStats:
    """Answer every question not yet in ``out``; returns counts."""
    qs = read_questions(questions) if not isinstance(questions, list) else questions
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(out)
    todo = [q for q in qs if q.key not in done]
    config = config or GenerationConfig(max_new_tokens=128)
    model_name = model_name or engine.name
    max_pixels = engine.loaded.image_config.max_pixels
    written = 0
    bar = tqdm(total=len(qs), initial=len(qs) - len(todo), desc="predict", unit="q", disable=not progress)
    with JsonlAppender(out) as log:
        for batch in _batches(todo, max(1, batch_size)):
            encoded = []
            for q in batch:
                try:
                    encoded.append(engine.encode(Prompt.ask(q.text, _load_images(q, image_dir, max_pixels), system)))
                except PromptError as e:
                    raise PredictError(f"question {q.question_id!r} (line {q.line}): {e}") from None
            completions = engine.generate(encoded, config)
            log.append({
                "question_id": q.question_id, "prompt": q.text, "text": c.text, "model": model_name,
                "metadata": {"finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                             "completion_tokens": c.completion_tokens},
            } for q, c in zip(batch, completions))
            written += len(batch)
            bar.update(len(batch))
    bar.close()
    return PredictStats(total=len(qs), skipped=len(qs) - len(todo), written=written)
