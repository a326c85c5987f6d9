"""Short-answer VQA (VQAv2, GQA, TextVQA style): LLaVA-1.5's single-word prompt,
normalised exact match, and VQAv2 soft accuracy when ten human answers are given.
Beside them: the share of answers that start with a reference (right, but the model
did not stop), and the majority-answer baseline per question type.

Question lines are those of `vistune predict` plus ``answers``, a list of one or ten
references (strings, or VQAv2's ``{"answer": ...}`` objects), and optional
``question_type`` / ``answer_type``.
"""
from __future__ import annotations

import os
from collections import defaultdict

from .normalize import normalize_answer, vqa_accuracy
from .questions import predict_and_score
from .report import pct, write_report
from .runner import EvalError, Generator, RunSettings

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


def references(row: dict) -> list[str]:
    """The reference strings of a question line; error names the question."""
    where = f"question {row['question_id']!r}"
    answers = row.get("answers")
    if not isinstance(answers, list) or not answers:
        raise EvalError(f"{where}: 'answers' must be a non-empty list")
    refs = []
    for a in answers:
        a = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise EvalError(f"{where}: each answer must be a string (or {{'answer': ...}})")
        refs.append(str(a))
    if len(refs) not in (1, 10):
        raise EvalError(f"{where}: expected 1 or 10 reference answers, got {len(refs)}")
    return refs


def starts_with_reference(prediction: str, refs: list[str]) -> bool:
    """The normalised answer begins with a normalised reference's words: right, whether or not the
    model stopped after it ("Blue no no no" for "blue"; exact match needs both)."""
    words = normalize_answer(prediction).split()
    return any(words[: len(r)] == r for r in (normalize_answer(x).split() for x in refs))


def score(questions: list[dict], predictions: dict[str, str]) -> tuple[dict, list[dict]]:
    """Accuracy overall, per question type and per answer type. Returns (metrics, rows)."""
    if not predictions:
        raise EvalError("no predictions to score")
    rows = []
    groups: dict[str, dict[str, list[float]]] = {"question_type": defaultdict(list), "answer_type": defaultdict(list)}
    soft = 0
    for q in questions:
        qid = q["question_id"]
        if qid not in predictions:
            continue
        refs = references(q)
        soft += len(refs) == 10
        acc = vqa_accuracy(predictions[qid], refs)
        norm = normalize_answer(predictions[qid])
        rows.append({"question_id": qid, "answer": normalize_answer(predictions[qid]), "accuracy": acc,
                     "exact_match": any(norm == normalize_answer(r) for r in refs),
                     "prefix_match": starts_with_reference(predictions[qid], refs)})
        for g in groups:
            if q.get(g) is not None:
                groups[g][str(q[g])].append(acc)
    n = len(rows)
    metrics = {
        "task": "vqa",
        "accuracy": sum(r["accuracy"] for r in rows) / n,
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "prefix_match": sum(r["prefix_match"] for r in rows) / n,
        "count": n,
        "soft_accuracy_questions": soft,
        "by": {g: {k: {"accuracy": sum(v) / len(v), "count": len(v)} for k, v in sorted(cats.items())}
               for g, cats in groups.items() if cats},
    }
    return metrics, rows


def majority_baseline(questions: list[dict], group: str = "question_type") -> dict[str, float]:
    """The accuracy of always giving the most frequent (first, normalised) reference answer of each
    ``group``: per category, and ``overall``. What a model scores that ignores the image and reads
    only the kind of question."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for q in questions:
        counts[str(q.get(group))][normalize_answer(references(q)[0])] += 1
    out = {k: max(c.values()) / sum(c.values()) for k, c in sorted(counts.items())}
    total = sum(sum(c.values()) for c in counts.values())
    out["overall"] = sum(max(c.values()) for c in counts.values()) / max(1, total)
    return out


def evaluate(
    generator: Generator,
    questions_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    settings: RunSettings,
    *,
    suffix: str | None = SHORT_ANSWER_SUFFIX,
    model_name: str = "",
) -> dict:
    """`vistune eval vqa`: predict, normalise, score, report. Returns the metrics."""
    # Every line's references are checked before any generation.
    metrics = predict_and_score("vqa", generator, questions_path, image_dir, out_dir, settings, required=("answers",),
                                check=references, score=score, suffix=suffix, model_name=model_name)
    mode = "VQAv2 soft accuracy" if metrics["soft_accuracy_questions"] == metrics["count"] else (
        "exact match" if metrics["soft_accuracy_questions"] == 0 else "mixed: soft (10 refs) / exact (1 ref)")
    summary = [("accuracy", f"{pct(metrics['accuracy'])}%"), ("scoring", mode),
               ("normalised exact match (any reference)", f"{pct(metrics['exact_match'])}%"),
               ("answer starts with a reference", f"{pct(metrics['prefix_match'])}%"),
               ("questions", str(metrics["count"]))]
    write_report(out_dir, metrics, title="VQA", summary=summary)
    return metrics
