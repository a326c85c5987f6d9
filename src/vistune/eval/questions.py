"""Question files: the JSONL lines `vistune predict` reads, plus each task's labels.

A line is ``{"question_id": ..., "image": "file.jpg", "text": "...", ...}`` (LLaVA's
question-file format); tasks add their own fields (``answers``, ``label``,
``category``). ``image`` may be missing for a text-only question.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..data.images import resolve_image_path
from .runner import EvalError, Generator, Query, RunSettings, finish_predictions, predict, read_jsonl

Scorer = Callable[[list[dict], dict[str, str]], tuple[dict, list[dict]]]


def load_questions(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a question file; every line needs ``question_id`` and ``text`` plus `required`.
    Ids are returned as strings; duplicates are an error naming both lines."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"question file not found: {path}")
    rows = read_jsonl(path)
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        where = f"{path.name} question {n}"
        for key in ("question_id", "text", *required):
            if row.get(key) is None:
                raise EvalError(f"{where}: missing field {key!r}")
        qid = str(row["question_id"])
        where = f"{path.name} question {qid!r}"
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise EvalError(f"{where}: 'text' must be a non-empty string")
        if "image" in row and row["image"] is not None and not isinstance(row["image"], str):
            raise EvalError(f"{where}: 'image' must be a file name")
        if qid in seen:
            raise EvalError(f"{where}: duplicate question_id (first at question {seen[qid]})")
        seen[qid] = n
        row["question_id"] = qid
    return rows


def with_suffix(text: str, suffix: str | None) -> str:
    """Append a prompt suffix on its own line, unless the file already carries it
    (LLaVA's released question files include theirs)."""
    text = text.strip()
    if not suffix or text.endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def query_for(row: dict, image_dir: str | os.PathLike | None, suffix: str | None = None) -> Query:
    images = [resolve_image_path(row["image"], image_dir)] if row.get("image") else []
    return Query(id=row["question_id"], text=with_suffix(row["text"], suffix), images=images)


def predict_and_score(
    task: str,
    generator: Generator,
    questions_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    settings: RunSettings,
    *,
    required: tuple[str, ...],
    check: Callable[[dict], object],
    score: Scorer,
    suffix: str | None,
    model_name: str,
) -> dict:
    """The run every question-file task shares: read and check every line before any
    generation, predict (resumable), score, write predictions. Returns the metrics."""
    questions = load_questions(questions_path, required=required)
    for q in questions:
        check(q)
    queries = [query_for(q, image_dir, suffix) for q in questions]
    preds = predict(generator, queries, out_dir, settings, desc=task, signature={"task": task, "model": model_name})
    metrics, rows = score(questions, {k: v["text"] for k, v in preds.items()})
    metrics["model"] = model_name
    finish_predictions(out_dir, [{**preds[r["question_id"]], **r} for r in rows])
    return metrics
