"""The one prediction loop every evaluation shares.

A task turns its data into `Query`s; `predict` runs them through anything with a
`generate(prompts, config)` method (vistune's `Engine`, or a fake in tests) in
batches, with a progress bar, appending each finished batch to
``predictions.jsonl`` so an interrupted run picks up where it stopped. The settings a
run was made with are kept in ``run.json``: resuming with other settings would mix
two experiments in one file, so that is refused unless ``overwrite`` is set.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from tqdm.auto import tqdm

from ..data.images import open_image
from ..files import JsonlAppender, write_json, write_jsonl

PREDICTIONS = "predictions.jsonl"
RUN_FILE = "run.json"


class EvalError(ValueError):
    """Bad evaluation input or settings; the message names the file, record or field."""


class Generator(Protocol):
    def generate(self, prompts: list, config: Any) -> list: ...


@dataclass
class Query:
    """One prompt to answer: a single human turn and the image files it refers to."""

    id: str
    text: str
    images: list[Path] = field(default_factory=list)
    system: str | None = None


@dataclass
class RunSettings:
    """How predictions are made; `max_new_tokens` and `temperature` are part of a run's
    identity (a resumed run must use the same values)."""

    batch_size: int = 8
    limit: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EvalError(f"batch size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be at least 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise EvalError(f"max new tokens must be at least 1, got {self.max_new_tokens}")


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = False) -> list[dict]:
    """Read a JSONL file. A broken *last* line is what a killed writer leaves behind; with
    `tolerate_torn_tail` it is dropped, anywhere else it is an error naming the line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and n == len(lines):
                break
            raise EvalError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def check_images(queries: Sequence[Query]) -> None:
    """Fail before hours of generation, not in the middle of them."""
    missing = [(q.id, p) for q in queries for p in q.images if not Path(p).is_file()]
    if missing:
        head = "; ".join(f"question {qid!r}: {p}" for qid, p in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise EvalError(f"{len(missing)} image file(s) not found: {head}{more}")


def generation_config(settings: RunSettings):
    from ..infer.engine import GenerationConfig

    return GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)


def _prompt(query: Query):
    from ..infer.engine import Prompt

    try:
        images = [open_image(p) for p in query.images]
    except ValueError as e:
        raise EvalError(f"question {query.id!r}: {e}") from None
    return Prompt(turns=[{"from": "human", "value": query.text}], images=images, system=query.system)


def _check_run(out_dir: Path, signature: dict, overwrite: bool) -> None:
    run_file = out_dir / RUN_FILE
    preds = out_dir / PREDICTIONS
    if overwrite:
        preds.unlink(missing_ok=True)
    elif run_file.exists() and preds.exists():
        old = json.loads(run_file.read_text(encoding="utf-8"))
        if old != signature:
            diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
            raise EvalError(
                f"{out_dir} holds predictions made with other settings ({', '.join(diff)} differ); "
                "resume with the same settings, pass --overwrite, or choose another --out"
            )
    write_json(run_file, signature)


def predict(
    generator: Generator,
    queries: Sequence[Query],
    out_dir: str | os.PathLike,
    settings: RunSettings,
    *,
    signature: dict | None = None,
    desc: str = "predict",
) -> dict[str, dict]:
    """Answer every query (the first `settings.limit` of them), resuming from
    ``out_dir/predictions.jsonl``. Returns question id -> prediction
    ``{"question_id", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens"}``.

    A stored prediction is reused only if its prompt is the one this run would send.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = list(queries)[: settings.limit] if settings.limit else list(queries)
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EvalError(f"question id {dup!r} occurs more than once")
    # Batch size and limit may change between resumes; what the model is asked may not.
    sig = {**{k: v for k, v in asdict(settings).items() if k not in ("overwrite", "progress", "limit", "batch_size")},
           **(signature or {})}
    _check_run(out_dir, sig, settings.overwrite)

    path = out_dir / PREDICTIONS
    wanted = {q.id: q for q in queries}
    done: dict[str, dict] = {}
    if path.exists():
        for row in read_jsonl(path, tolerate_torn_tail=True):
            qid = str(row.get("question_id"))
            if qid in wanted and row.get("prompt") == wanted[qid].text and isinstance(row.get("text"), str):
                done[qid] = row
        # Drop stale or torn lines now, so appends below extend a clean file.
        write_jsonl(path, done.values())

    todo = [q for q in queries if q.id not in done]
    check_images(todo)
    if todo:
        config = generation_config(settings)
        bar = tqdm(total=len(queries), initial=len(done), desc=desc, unit="q", disable=not settings.progress)
        with JsonlAppender(path) as log:
            for start in range(0, len(todo), settings.batch_size):
                batch = todo[start:start + settings.batch_size]
                rows = []
                for q, c in _generate(generator, batch, config):
                    done[q.id] = {
                        "question_id": q.id,
                        "prompt": q.text,
                        "text": c.text,
                        "finish_reason": getattr(c, "finish_reason", None),
                        "prompt_tokens": getattr(c, "prompt_tokens", None),
                        "completion_tokens": getattr(c, "completion_tokens", None),
                    }
                    rows.append(done[q.id])
                log.append(rows)
                bar.update(len(batch))
        bar.close()
    return {q.id: done[q.id] for q in queries}


def _generate(generator: Generator, batch: list[Query], config: Any) -> list[tuple[Query, Any]]:
    try:
        completions = generator.generate([_prompt(q) for q in batch], config)
    except EvalError:
        raise
    except ValueError as e:
        # A bad prompt (too long, image mismatch) fails its whole batch: find which one
        # and name it; the rest of the batch is answered.
        if len(batch) == 1:
            raise EvalError(f"question {batch[0].id!r}: {e}") from e
        return [pair for q in batch for pair in _generate(generator, [q], config)]
    if len(completions) != len(batch):
        raise EvalError(f"generator returned {len(completions)} completions for {len(batch)} prompts")
    return list(zip(batch, completions))


def finish_predictions(out_dir: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Rewrite predictions.jsonl in question order, each line enriched with what the task
    made of it (parsed answer, score); later resumes ignore the extra fields."""
    write_jsonl(Path(out_dir) / PREDICTIONS, rows)
