"""The GPT-judged bench (LLaVA-Bench style).

For each question: a reference answer (given, or written by a text-only LLM that
sees the image only as captions and boxes), the model's answer, and a judge LLM that
scores both from 1 to 10 on the first line of its review. The result is the relative
score, mean(model) / mean(reference) x 100, overall and per category (conversation,
detail, complex). Any OpenAI-compatible endpoint serves as reference writer and judge,
through the `openai` client.

Files:

- questions (JSONL): ``question_id``, ``image``, ``text``, ``category`` (conv |
  conversation | detail | complex), optional ``reference`` (a given reference answer);
- context (JSONL), one line per image, keyed by ``image`` (or ``id``): LLaVA's
  ``caption`` (string or list) or ``captions``, with optional ``instances`` /
  ``boxes`` (``{"category", "bbox"}``); a line with ``width``, ``height`` and
  ``boxes`` in pixels (vistune's annotation form) is normalised like the data engine does;
- references (JSONL, optional): ``question_id`` and ``text`` (LLaVA's answer files).

Every LLM call is cached in ``judge_cache.jsonl`` under (question id, role), with a
hash of the request, so a rerun or a resumed run calls the API only for what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..files import JsonlAppender, write_jsonl
from ..instruct.annotations import ImageAnnotation, symbolic_context
from .questions import load_questions, query_for
from .report import markdown_table, write_report
from .runner import EvalError, Generator, RunSettings, finish_predictions, predict, read_jsonl

CACHE = "judge_cache.jsonl"
CATEGORY_NAMES = {"conv": "conversation", "conversation": "conversation", "detail": "detail", "complex": "complex"}

REFERENCE_SYSTEM = (
    "You are an AI visual assistant answering a question about one image. You cannot see the image; "
    "instead you are given what it shows: captions and, when present, objects with bounding boxes as "
    "[x1, y1, x2, y2] coordinates. Answer as if you were looking at the image, helpfully and accurately, "
    "without mentioning the captions, the boxes or the coordinates."
)
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_INSTRUCTION = (
    "We would like your feedback on the performance of two AI assistants answering the user question "
    "above. The user asks the question while looking at an image; for your reference, the visual content "
    "of the image is described by the context above.\n"
    "Rate the helpfulness, relevance, accuracy and level of detail of their answers. Each assistant gets "
    "an overall score from 1 to 10, where higher means better overall performance.\n"
    "First output a single line containing only the two scores, for Assistant 1 and Assistant 2 in that "
    "order, separated by a space. On the following lines, explain your evaluation, avoiding any bias and "
    "making sure the order in which the answers were presented does not affect your judgment."
)


@dataclass
class JudgeSettings:
    judge_model: str
    reference_model: str | None = None  # writes missing references; defaults to the judge model
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.2
    max_tokens: int = 1024
    workers: int = 4
    max_retries: int = 5
    timeout: float = 120.0


def make_client(s: JudgeSettings):
    import openai

    key = os.environ.get(s.api_key_env)
    if not key:
        if s.base_url is None:
            raise EvalError(f"no API key: set the environment variable {s.api_key_env} (or name another "
                            "with --api-key-env), or pass --base-url for a local endpoint")
        key = "unused"  # local OpenAI-compatible servers accept any key; the client wants one
    return openai.OpenAI(api_key=key, base_url=s.base_url, max_retries=s.max_retries, timeout=s.timeout)


# ------------------------------------------------------------------------ the files

def context_text(line: dict) -> str:
    """What the reference writer and the judge know of the image."""
    if "width" in line and "height" in line and isinstance(line.get("boxes"), list) and (line.get("captions") is not None):
        ann = ImageAnnotation.from_dict({"id": line.get("id", line.get("image", "?")), "file": line.get("image", ""), **line})
        return symbolic_context(ann)
    caps = line.get("caption", line.get("captions", []))
    caps = [caps] if isinstance(caps, str) else [str(c) for c in caps or []]
    boxes = line.get("instances", line.get("boxes")) or []
    lines = list(caps)
    if boxes:
        lines.append("")
        for b in boxes:
            bbox = ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in b["bbox"])
            lines.append(f"{b['category']}: [{bbox}]")
    return "\n".join(lines).strip()


def load_contexts(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"context file not found: {path}")
    out = {}
    for n, line in enumerate(read_jsonl(path), 1):
        key = line.get("image", line.get("id"))
        if key is None:
            raise EvalError(f"{path.name} line {n}: needs 'image' (or 'id') to match questions")
        try:
            out[str(key)] = context_text(line)
        except (KeyError, TypeError, ValueError) as e:
            raise EvalError(f"{path.name} context {key!r}: malformed captions/boxes ({e})") from None
    return out


def load_references(path: str | os.PathLike | None, questions: list[dict]) -> dict[str, str]:
    refs = {q["question_id"]: str(q["reference"]) for q in questions if q.get("reference")}
    if path is not None:
        for n, line in enumerate(read_jsonl(path), 1):
            text = line.get("text", line.get("answer"))
            if line.get("question_id") is None or not isinstance(text, str):
                raise EvalError(f"{Path(path).name} line {n}: needs 'question_id' and 'text'")
            refs[str(line["question_id"])] = text
    return refs


def category(q: dict) -> str:
    c = str(q.get("category", "all"))
    return CATEGORY_NAMES.get(c.removeprefix("llava_bench_"), c)


# ------------------------------------------------------------------------ the cache

class JudgeCache:
    """Append-only JSONL of LLM replies keyed by (question id, role); the request hash
    makes a changed prompt (a new model answer, another judge) miss the cache."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], dict] = {}
        if self.path.exists():
            for row in read_jsonl(self.path, tolerate_torn_tail=True):
                self._rows[(str(row["question_id"]), row["role"])] = row
            self._rewrite()

    def _rewrite(self) -> None:
        write_jsonl(self.path, self._rows.values())

    def get(self, qid: str, role: str, key: str) -> str | None:
        row = self._rows.get((qid, role))
        return row["content"] if row and row.get("request") == key else None

    def put(self, qid: str, role: str, key: str, model: str, content: str) -> None:
        row = {"question_id": qid, "role": role, "request": key, "model": model, "content": content}
        with self._lock:
            self._rows[(qid, role)] = row
            with JsonlAppender(self.path) as log:
                log.append([row])


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def chat(client: Any, request: dict) -> str:
    resp = client.chat.completions.create(**request)
    content = resp.choices[0].message.content if resp.choices else None
    if not content:
        raise EvalError(f"model {request['model']!r} returned an empty reply")
    return content


def run_calls(client: Any, cache: JudgeCache, calls: list[tuple[str, str, dict]], workers: int, desc: str) -> dict[str, str]:
    """Make each (question id, role, request) call not already cached; returns qid -> reply."""
    out: dict[str, str] = {}
    todo = []
    for qid, role, req in calls:
        hit = cache.get(qid, role, request_key(req))
        if hit is not None:
            out[qid] = hit
        else:
            todo.append((qid, role, req))

    def one(item: tuple[str, str, dict]) -> tuple[str, str]:
        qid, role, req = item
        try:
            content = chat(client, req)
        except EvalError:
            raise
        except Exception as e:  # the openai client's errors: name the question and the endpoint's reason
            raise EvalError(f"question {qid!r} ({role}): request to {req['model']!r} failed: {e}") from None
        cache.put(qid, role, request_key(req), req["model"], content)
        return qid, content

    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                tqdm(total=len(calls), initial=len(calls) - len(todo), desc=desc, unit="call") as bar:
            for qid, content in pool.map(one, todo):
                out[qid] = content
                bar.update(1)
    return out


# ---------------------------------------------------------------------- the prompts

def reference_request(q: dict, context: str, model: str, s: JudgeSettings) -> dict:
    user = f"[Image description]\n{context}\n\n[Question]\n{q['text'].replace('<image>', '').strip()}"
    return {"model": model, "messages": [{"role": "system", "content": REFERENCE_SYSTEM},
                                         {"role": "user", "content": user}],
            "temperature": s.temperature, "max_tokens": s.max_tokens}


def review_request(q: dict, context: str, reference: str, answer: str, s: JudgeSettings) -> dict:
    user = (f"[Context]\n{context}\n\n[Question]\n{q['text'].replace('<image>', '').strip()}\n\n"
            f"[Assistant 1]\n{reference.strip()}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer.strip()}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_INSTRUCTION}\n\n")
    return {"model": s.judge_model, "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                                                 {"role": "user", "content": user}],
            "temperature": s.temperature, "max_tokens": s.max_tokens}


_TWO_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[,\s]\s*(\d+(?:\.\d+)?)\s*$")


def parse_scores(review: str) -> tuple[float, float] | None:
    """(reference score, model score) from a review's first line, as LLaVA reads it
    (commas as spaces, exactly two numbers); failing that, the first line anywhere in the
    review that is just two numbers. None when there is none."""
    lines = review.strip().splitlines()
    if not lines:
        return None
    first = lines[0].replace(",", " ").split()
    if len(first) == 2:
        try:
            return float(first[0]), float(first[1])
        except ValueError:
            pass
    for line in lines[1:]:
        m = _TWO_SCORES.match(line)
        if m:
            return float(m.group(1)), float(m.group(2))
    return None


# ----------------------------------------------------------------------- the scores

def score(rows: list[dict]) -> dict:
    """Relative score (percent) and mean scores overall and per category; rows need
    ``category`` and ``scores`` ([reference, model] or None when unparseable)."""
    good = [r for r in rows if r["scores"] is not None]
    cats: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in good:
        cats[r["category"]].append(tuple(r["scores"]))

    def summary(pairs: list[tuple[float, float]]) -> dict:
        ref = sum(p[0] for p in pairs) / len(pairs)
        mod = sum(p[1] for p in pairs) / len(pairs)
        return {"relative_score": 100 * mod / ref if ref else None, "reference_score": ref, "model_score": mod,
                "count": len(pairs)}

    if not good:
        raise EvalError("no review could be parsed into two scores")
    overall = summary([tuple(r["scores"]) for r in good])
    overall["scored"] = overall.pop("count")
    return {"task": "bench", **overall, "unparsed_reviews": [r["question_id"] for r in rows if r["scores"] is None],
            "by": {"category": {c: summary(p) for c, p in sorted(cats.items())}}}


def evaluate(
    generator: Generator,
    questions_path: str | os.PathLike,
    context_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    settings: RunSettings,
    judge: JudgeSettings,
    *,
    references_path: str | os.PathLike | None = None,
    model_name: str = "",
    client: Any = None,
    client_factory: Callable[[JudgeSettings], Any] = make_client,
) -> dict:
    """`vistune eval bench`: model answers, references, reviews, relative scores."""
    out_dir = Path(out_dir)
    questions = load_questions(questions_path)
    contexts = load_contexts(context_path)
    if settings.limit:
        questions = questions[: settings.limit]
    for q in questions:
        if str(q.get("image")) not in contexts:
            raise EvalError(f"question {q['question_id']!r}: no context line for image {q.get('image')!r} "
                            f"in {Path(context_path).name}")
    given = load_references(references_path, questions)
    queries = [query_for(q, image_dir) for q in questions]
    client = client if client is not None else client_factory(judge)  # a missing key fails before generation
    preds = predict(generator, queries, out_dir, settings, desc="bench answers",
                    signature={"task": "bench", "model": model_name})

    cache = JudgeCache(out_dir / CACHE)
    ref_model = judge.reference_model or judge.judge_model
    ctx = {q["question_id"]: contexts[str(q["image"])] for q in questions}
    made = run_calls(client, cache, [(q["question_id"], "reference", reference_request(q, ctx[q["question_id"]], ref_model, judge))
                                     for q in questions if q["question_id"] not in given],
                     judge.workers, "references")
    refs = {**made, **given}
    reviews = run_calls(client, cache, [(q["question_id"], "review",
                                         review_request(q, ctx[q["question_id"]], refs[q["question_id"]],
                                                        preds[q["question_id"]]["text"], judge))
                                        for q in questions], judge.workers, "reviews")

    rows = []
    for q in questions:
        qid = q["question_id"]
        sc = parse_scores(reviews[qid])
        rows.append({**preds[qid], "category": category(q), "reference": refs[qid],
                     "reference_source": "given" if qid in given else ref_model, "review": reviews[qid],
                     "scores": list(sc) if sc else None})
    metrics = score(rows)
    metrics.update(model=model_name, judge_model=judge.judge_model, reference_model=ref_model, count=len(rows))
    finish_predictions(out_dir, rows)
    summary = [("relative score (model / reference)", _num(metrics["relative_score"], "%")),
               ("mean model score (1-10)", _num(metrics["model_score"])),
               ("mean reference score (1-10)", _num(metrics["reference_score"])),
               ("questions", str(len(rows))), ("judge", judge.judge_model), ("reference answers", ref_model),
               ("unparseable reviews (left out)", str(len(metrics["unparsed_reviews"])))]
    sections = []
    if metrics["unparsed_reviews"]:
        sections.append("## Unparseable reviews (left out of the scores)\n\n" + markdown_table(
            ["question", "review"], [[r["question_id"], r["review"][:160]] for r in rows if r["scores"] is None]))
    write_report(out_dir, metrics, title="LLaVA-Bench (GPT-judged)", summary=summary, chart_key="relative_score",
                 chart_label="relative score (%)", chart_scale=1.0, sections=sections)
    return metrics


def _num(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.2f}{unit}"
