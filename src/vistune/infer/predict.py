"""Batch answers for a question file (the LLaVA evaluation format), resumable.

Question line: ``{"question_id": ..., "image": PATH | [PATHS] (optional), "text": ...}``
(``<image>`` placeholders optional; images go first when absent).
Answer line:   ``{"question_id": ..., "prompt": ..., "text": ..., "model": ..., "metadata": {...}}``

Answers are appended (and fsynced) batch by batch; a rerun skips the question ids
already answered, so an interrupted job loses at most one batch. A half-written
last line (the process died mid-write) is cut off before appending.

A bad question (a malformed line, a missing or corrupt image, a prompt over the
context) stops the run with a `PredictError` naming it. With ``skip_bad`` it is
listed instead in ``<answers>.errors.jsonl`` (``{"question_id", "line", "reason"}``,
appended like the answers) and the run goes on. A listed question is not answered, so
a rerun tries it again: the user may have fixed its image meanwhile.
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


@dataclass
class BadQuestion:
    """A question that cannot be answered, as the errors file lists it."""

    question_id: object  # None when the line gives none (not JSON, no 'question_id')
    line: int
    reason: str

    def row(self) -> dict:
        return {"question_id": self.question_id, "line": self.line, "reason": self.reason}


class _BadLine(Exception):
    """A line that is no usable question, with its id when it gives one."""

    def __init__(self, reason: str, question_id: object = None):
        super().__init__(reason)
        self.reason = reason
        self.question_id = question_id


def _parse_question(raw: bytes, n: int) -> Question:
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadLine("not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise _BadLine(f"not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise _BadLine("a question must be a JSON object")
    if "question_id" not in d:
        raise _BadLine("missing 'question_id'")
    qid = d["question_id"]
    text = d.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _BadLine(f"question {qid!r} has no 'text'", qid)
    image = d.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise _BadLine(f"question {qid!r}: 'image' must be a path or a list of paths", qid)
    return Question(qid, text, images, n)


def scan_questions(path: str | os.PathLike) -> tuple[list[Question], list[BadQuestion]]:
    """The usable questions of a file and its bad lines (malformed, repeated ids), in file order."""
    path = Path(path)
    if not path.exists():
        raise PredictError(f"question file not found: {path}")
    good: list[Question] = []
    bad: list[BadQuestion] = []
    seen: dict[str, int] = {}
    # Bytes, decoded line by line: one line that is not UTF-8 is one bad line, not an unreadable file.
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                q = _parse_question(raw, n)
                if q.key in seen:
                    raise _BadLine(f"question_id {q.question_id!r} repeats line {seen[q.key]}", q.question_id)
            except _BadLine as e:
                bad.append(BadQuestion(e.question_id, n, e.reason))
                continue
            seen[q.key] = n
            good.append(q)
    return good, bad


def read_questions(path: str | os.PathLike) -> list[Question]:
    """The questions of a file; the first bad line raises `PredictError` naming it."""
    good, bad = scan_questions(path)
    if bad:
        raise PredictError(f"{path}:{bad[0].line}: {bad[0].reason}")
    return good


def errors_path(out: str | os.PathLike) -> Path:
    """Where a ``skip_bad`` run lists the questions it skipped: beside the answers file."""
    out = Path(out)
    return out.with_name(out.name + ".errors.jsonl")


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
    skipped: int  # already answered before this run
    written: int
    bad: int = 0  # skipped as bad by this run (``skip_bad``)
    errors: Path | None = None  # the file listing them, when there are any


class _BadLog:
    """The errors file of a ``skip_bad`` run. Each run starts it afresh (every question it lists
    is retried, so an old entry would only be stale) and creates it at its first bad question,
    so it exists only when there is something to fix."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._log: JsonlAppender | None = None
        path.unlink(missing_ok=True)

    def add(self, bad: list[BadQuestion]) -> None:
        if not bad:
            return
        if self._log is None:
            self._log = JsonlAppender(self.path)
        self._log.append(b.row() for b in bad)
        self.count += len(bad)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


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
    skip_bad: bool = False,
) -> PredictStats:
    """Answer every question not yet in ``out``; returns counts.

    A bad question raises `PredictError` (answers of earlier batches are kept); with ``skip_bad``
    it is listed in `errors_path(out)` instead, and the good questions of its batch are answered."""
    if isinstance(questions, list):
        qs, bad_lines = questions, []
    else:
        qs, bad_lines = scan_questions(questions) if skip_bad else (read_questions(questions), [])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(out)
    todo = [q for q in qs if q.key not in done]
    config = config or GenerationConfig(max_new_tokens=128)
    model_name = model_name or engine.name
    max_pixels = engine.loaded.image_config.max_pixels
    written = 0
    bad_log = _BadLog(errors_path(out)) if skip_bad else None
    bar = tqdm(total=len(qs), initial=len(qs) - len(todo), desc="predict", unit="q", disable=not progress)
    try:
        if bad_log is not None:
            bad_log.add(bad_lines)
        with JsonlAppender(out) as log:
            for batch in _batches(todo, max(1, batch_size)):
                ready: list[Question] = []
                encoded = []
                bad: list[BadQuestion] = []
                # Everything a question alone can get wrong shows here, before the batch is generated:
                # what fails in generation (memory, the device) would fail for any question.
                for q in batch:
                    try:
                        images = [open_image(resolve_image_path(p, image_dir), max_pixels) for p in q.images]
                        encoded.append(engine.encode(Prompt.ask(q.text, images, system)))
                    except (ImageError, PromptError) as e:
                        if bad_log is None:
                            raise PredictError(f"question {q.question_id!r} (line {q.line}): {e}") from None
                        bad.append(BadQuestion(q.question_id, q.line, str(e)))
                        continue
                    ready.append(q)
                if bad_log is not None:
                    bad_log.add(bad)
                completions = engine.generate(encoded, config)
                log.append({
                    "question_id": q.question_id, "prompt": q.text, "text": c.text, "model": model_name,
                    "metadata": {"finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                                 "completion_tokens": c.completion_tokens},
                } for q, c in zip(ready, completions))
                written += len(ready)
                bar.update(len(batch))
    finally:
        bar.close()
        if bad_log is not None:
            bad_log.close()
    n_bad = bad_log.count if bad_log is not None else 0
    return PredictStats(total=len(qs) + len(bad_lines), skipped=len(qs) - len(todo), written=written,
                        bad=n_bad, errors=bad_log.path if n_bad else None)
