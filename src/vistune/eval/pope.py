"""POPE (object hallucination): yes/no questions about objects, scored as a binary
classifier with "yes" as the positive class.

Question lines: ``question_id``, ``image``, ``text``, ``label`` ("yes"/"no") and an
optional ``category`` (random, popular, adversarial).
"""
from __future__ import annotations

import os
from collections import defaultdict

from .questions import predict_and_score
from .report import markdown_table, pct, write_report
from .runner import EvalError, Generator, RunSettings
from .vqa import SHORT_ANSWER_SUFFIX


def parse_yes_no(text: str) -> str:
    """LLaVA's rule: keep the text before the first '.', drop commas, split on spaces;
    "no" if any word is "No", "not" or "no", otherwise "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def binary_metrics(labels: list[str], preds: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as positive."""
    tp = sum(p == "yes" and y == "yes" for y, p in zip(labels, preds))
    fp = sum(p == "yes" and y == "no" for y, p in zip(labels, preds))
    tn = sum(p == "no" and y == "no" for y, p in zip(labels, preds))
    fn = sum(p == "no" and y == "yes" for y, p in zip(labels, preds))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": n}


def label_of(row: dict) -> str:
    label = str(row.get("label", "")).strip().lower()
    if label not in ("yes", "no"):
        raise EvalError(f"question {row['question_id']!r}: 'label' must be 'yes' or 'no', got {row.get('label')!r}")
    return label


def score(questions: list[dict], predictions: dict[str, str]) -> tuple[dict, list[dict]]:
    rows, per_cat = [], defaultdict(list)
    for q in questions:
        qid = q["question_id"]
        if qid not in predictions:
            continue
        row = {"question_id": qid, "label": label_of(q), "answer": parse_yes_no(predictions[qid])}
        row["correct"] = row["answer"] == row["label"]
        rows.append(row)
        if q.get("category") is not None:
            per_cat[str(q["category"])].append(row)
    if not rows:
        raise EvalError("no predictions to score")
    metrics = {"task": "pope", **binary_metrics([r["label"] for r in rows], [r["answer"] for r in rows])}
    by = {c: binary_metrics([r["label"] for r in rs], [r["answer"] for r in rs]) for c, rs in sorted(per_cat.items())}
    metrics["by"] = {"category": {c: {k: m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "count")}
                                  for c, m in by.items()}} if by else {}
    if by:
        # The LLaVA-1.5 paper's POPE number: F1 averaged over the splits.
        metrics["f1_mean_over_categories"] = sum(m["f1"] for m in by.values()) / len(by)
    return metrics, rows


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
    """`vistune eval pope`: predict, parse yes/no, score, report. Returns the metrics."""
    metrics = predict_and_score("pope", generator, questions_path, image_dir, out_dir, settings, required=("label",),
                                check=label_of, score=score, suffix=suffix, model_name=model_name)
    summary = [(k, f"{pct(metrics[k])}%") for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
    summary += [("questions", str(metrics["count"]))]
    if "f1_mean_over_categories" in metrics:
        summary.append(("F1 averaged over categories", f"{pct(metrics['f1_mean_over_categories'])}%"))
    confusion = markdown_table(["", "label yes", "label no"],
                               [["answered yes", metrics["tp"], metrics["fp"]], ["answered no", metrics["fn"], metrics["tn"]]])
    write_report(out_dir, metrics, title="POPE", summary=summary, sections=["## Confusion\n\n" + confusion])
    return metrics
