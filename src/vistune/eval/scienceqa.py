"""ScienceQA: the official files, the paper's QCM->LEA format, answer extraction, scores.

Official files:

- ``problems.json``: ``{pid: {"question", "choices": [...], "answer": <index>, "hint",
  "image": "image.png" | null, "subject", "grade": "grade1".."grade12", "lecture",
  "solution", "topic", "category", "skill", "task", "split"}}``
- ``pid_splits.json``: ``{"train": [pid, ...], "val": [...], "test": [...], ...}``
- images: ``<images>/<split>/<pid>/image.png``

The instruction is ``{question}\\nContext: {hint or N/A}\\nOptions: (A) ... (B) ...``
(then ``\\n<image>`` for illustrated problems); the training target is
``{lecture} {solution} The answer is {letter}.``. Newlines inside lecture and solution
are kept as newlines (the original scripts escape them to a literal backslash-n, an
artefact of their GPT-3 prompts).
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from ..data.records import parse_record, write_records
from ..text.templates import IMAGE_PLACEHOLDER
from .report import markdown_table, pct, write_report
from .runner import EvalError, Generator, Query, RunSettings, finish_predictions, predict

LETTERS = string.ascii_uppercase
# LLaVA-1.5 zero-shot suffix (used with `letter_prompt`).
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
# The column order of the paper's table.
PAPER_COLUMNS = [("subject", "NAT"), ("subject", "SOC"), ("subject", "LAN"), ("context", "TXT"),
                 ("context", "IMG"), ("context", "NO"), ("grade", "G1-6"), ("grade", "G7-12")]
_REQUIRED = {"question": str, "choices": list, "answer": int, "subject": str, "grade": str}


# ---------------------------------------------------------------------------- files

def _read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise EvalError(f"ScienceQA {what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON: {e}") from None


def load_problems(path: str | os.PathLike) -> dict[str, dict]:
    """Read problems.json, checking every field the format and the scores depend on."""
    path = Path(path)
    data = _read_json(path, "problems")
    if not isinstance(data, dict):
        raise EvalError(f"{path}: expected an object mapping problem ids to problems")
    for pid, p in data.items():
        _check_problem(str(pid), p, path.name)
    return {str(k): v for k, v in data.items()}


def _check_problem(pid: str, p: object, source: str) -> None:
    where = f"{source} problem {pid!r}"
    if not isinstance(p, dict):
        raise EvalError(f"{where}: expected an object")
    for key, typ in _REQUIRED.items():
        if key not in p:
            raise EvalError(f"{where}: missing field {key!r}")
        if not isinstance(p[key], typ) or (typ is int and isinstance(p[key], bool)):
            raise EvalError(f"{where}: field {key!r} must be {typ.__name__}, got {type(p[key]).__name__}")
    choices = p["choices"]
    if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise EvalError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} strings")
    if not 0 <= p["answer"] < len(choices):
        raise EvalError(f"{where}: 'answer' {p['answer']} is not an index into its {len(choices)} choices")
    for key in ("hint", "lecture", "solution"):
        if p.get(key) is not None and not isinstance(p[key], str):
            raise EvalError(f"{where}: field {key!r} must be a string")
    if p.get("image") is not None and not isinstance(p["image"], str):
        raise EvalError(f"{where}: field 'image' must be a file name or null")


def load_split(path: str | os.PathLike, split: str, problems: dict[str, dict]) -> list[str]:
    """The problem ids of `split` from pid_splits.json, in the file's order."""
    path = Path(path)
    splits = _read_json(path, "splits")
    if not isinstance(splits, dict) or split not in splits:
        have = sorted(splits) if isinstance(splits, dict) else []
        raise EvalError(f"{path}: no split {split!r} (has: {', '.join(have) or 'none'})")
    if not isinstance(splits[split], list):
        raise EvalError(f"{path}: split {split!r} must be a list of problem ids")
    pids = [str(p) for p in splits[split]]
    missing = [p for p in pids if p not in problems]
    if missing:
        raise EvalError(f"{path}: split {split!r} names {len(missing)} problem(s) not in problems.json, "
                        f"e.g. {missing[0]!r}")
    return pids


def image_relpath(pid: str, problem: dict, split: str) -> str | None:
    return f"{split}/{pid}/{problem['image']}" if problem.get("image") else None


# --------------------------------------------------------------------------- format

def context_text(problem: dict) -> str:
    return (problem.get("hint") or "").strip() or "N/A"


def options_text(choices: list[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def instruction(problem: dict, *, with_image: bool | None = None, letter_prompt: bool = False) -> str:
    """The QCM input: question, context, options (and the image placeholder at the end)."""
    text = f"{problem['question']}\nContext: {context_text(problem)}\nOptions: {options_text(problem['choices'])}"
    text = _tidy(text)
    if letter_prompt:
        text += "\n" + LETTER_SUFFIX
    if with_image if with_image is not None else bool(problem.get("image")):
        text += "\n" + IMAGE_PLACEHOLDER
    return text


def target(problem: dict) -> str:
    """The LEA output: lecture, solution, then 'The answer is X.'."""
    letter = LETTERS[problem["answer"]]
    return _tidy(f"{problem.get('lecture') or ''} {problem.get('solution') or ''} The answer is {letter}.")


def _tidy(s: str) -> str:
    # As the original converter does: no doubled spaces where a field was empty.
    while "  " in s:
        s = s.replace("  ", " ")
    return s.strip()


def to_records(problems: dict[str, dict], pids: list[str], split: str,
               image_dir: str | os.PathLike | None) -> list[dict]:
    """Single-turn LLaVA training records, one per problem; image files must exist."""
    records, missing = [], []
    for pid in pids:
        p = problems[pid]
        rel = image_relpath(pid, p, split)
        if rel and image_dir is not None and not (Path(image_dir) / rel).is_file():
            missing.append(f"problem {pid!r}: {Path(image_dir) / rel}")
        rec = {"id": pid}
        if rel:
            rec["image"] = rel
        rec["conversations"] = [{"from": "human", "value": instruction(p)}, {"from": "gpt", "value": target(p)}]
        try:
            parse_record(rec, f"problem {pid}")
        except ValueError as e:
            raise EvalError(str(e)) from None
        records.append(rec)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise EvalError(f"{len(missing)} ScienceQA image(s) not found: " + "; ".join(missing[:5]) + more)
    return records


def convert(problems_path: str | os.PathLike, splits_path: str | os.PathLike, image_dir: str | os.PathLike | None,
            split: str, out: str | os.PathLike, limit: int | None = None) -> int:
    """`vistune data scienceqa`: write the split as LLaVA JSONL; returns the record count."""
    problems = load_problems(problems_path)
    pids = load_split(splits_path, split, problems)[:limit]
    records = to_records(problems, pids, split, image_dir)
    write_records(records, out)
    return len(records)


# ----------------------------------------------------------------------- extraction

@dataclass
class Extracted:
    letter: str | None  # None: unparseable (LLaVA's "FAILED")
    rule: str


_LLAVA_PATTERN = re.compile(r"The answer is ([A-Z]).")
_BARE = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_LEADING = re.compile(r"^\(?([A-Z])[).:]\s")
# "answer is (B)", "Answer: B.", "the correct answer is B" - the letter must stand alone.
_ANSWER_IS = re.compile(r"[Aa]nswer(?:\s+is)?\s*:?\s*(?:\(([A-Z])\)|([A-Z])(?=[.,;:!)]|\s*$))")


def extract_answer(text: str, choices: list[str]) -> Extracted:
    """The letter a reply chose. LLaVA's rules first, in its order: the reply is exactly a
    letter; it starts with "X. "; exactly one match of ``The answer is ([A-Z]).``. Then
    fallbacks for styles those miss: a bare "(B)"/"B)"; a leading "(B) ..."; every
    "answer is (X)"/"Answer: X" agreeing on one letter; the reply being one choice's
    text. Anything else is unparseable (counted wrong and listed)."""
    options = tuple(LETTERS[:5])  # LLaVA's rules accept A-E whatever the number of choices
    if text in options:
        return Extracted(text, "letter")
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return Extracted(text[0], "leading letter")
    found = _LLAVA_PATTERN.findall(text)
    if len(found) == 1:
        return Extracted(found[0], "the answer is")

    valid = LETTERS[: len(choices)]
    s = text.strip()
    m = _BARE.match(s) or _LEADING.match(s)
    if m and m.group(1) in valid:
        return Extracted(m.group(1), "fallback: letter")
    said = {a or b for a, b in _ANSWER_IS.findall(text)} | set(found)
    said &= set(valid)
    if len(said) == 1:
        return Extracted(said.pop(), "fallback: answer is")
    bare = _norm_choice(re.sub(r"^(?:the )?answer(?: is)?:?\s*", "", s, flags=re.IGNORECASE))
    hits = [i for i, c in enumerate(choices) if _norm_choice(c) == bare]
    if len(hits) == 1:
        return Extracted(LETTERS[hits[0]], "fallback: choice text")
    return Extracted(None, "failed")


def _norm_choice(s: str) -> str:
    return s.strip().strip(".").strip().strip('"').lower()


# --------------------------------------------------------------------------- scores

def categories(problem: dict) -> dict[str, list[str]]:
    """The paper's categories (the official ScienceQA scorer's rules): subject; context
    TXT if there is a hint, IMG if there is an image (both can hold), NO if neither;
    grade 1-6 or 7-12."""
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    context = (["TXT"] if has_text else []) + (["IMG"] if has_image else []) + ([] if has_text or has_image else ["NO"])
    m = re.fullmatch(r"grade(\d+)", problem["grade"])
    grade = [] if not m else ["G1-6"] if 1 <= int(m.group(1)) <= 6 else ["G7-12"] if int(m.group(1)) <= 12 else []
    subject = [SUBJECTS[problem["subject"]]] if problem["subject"] in SUBJECTS else []
    return {"subject": subject, "context": context, "grade": grade}


def score(problems: dict[str, dict], predictions: dict[str, str]) -> tuple[dict, list[dict]]:
    """Accuracy overall and per category from pid -> reply text. Returns (metrics, rows)."""
    if not predictions:
        raise EvalError("no predictions to score")
    rows = []
    by: dict[str, dict[str, list[int]]] = {"subject": {}, "context": {}, "grade": {}}
    for g, name in PAPER_COLUMNS:
        by[g][name] = [0, 0]
    for pid, text in predictions.items():
        p = problems[pid]
        ex = extract_answer(text, p["choices"])
        truth = LETTERS[p["answer"]]
        ok = ex.letter == truth
        rows.append({"question_id": pid, "answer": truth, "pred": ex.letter, "rule": ex.rule, "correct": ok})
        for group, names in categories(p).items():
            for name in names:
                by[group].setdefault(name, [0, 0])
                by[group][name][0] += ok
                by[group][name][1] += 1
    n, correct = len(rows), sum(r["correct"] for r in rows)
    failed = [r["question_id"] for r in rows if r["pred"] is None]
    metrics = {
        "task": "scienceqa",
        "accuracy": correct / n,
        "count": n,
        "correct": correct,
        "failed_count": len(failed),
        "failed": failed,
        "by": {g: {name: {"accuracy": (c / t if t else None), "count": t} for name, (c, t) in cats.items()}
               for g, cats in by.items()},
    }
    return metrics, rows


def evaluate(
    generator: Generator,
    problems_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    settings: RunSettings,
    *,
    split: str = "test",
    letter_prompt: bool = False,
    model_name: str = "",
) -> dict:
    """`vistune eval scienceqa`: predict, extract, score, report. Returns the metrics."""
    problems = load_problems(problems_path)
    pids = load_split(splits_path, split, problems)
    queries = []
    for pid in pids:
        p = problems[pid]
        rel = image_relpath(pid, p, split)
        images = [Path(image_dir) / rel] if rel and image_dir is not None else []
        if rel and image_dir is None:
            raise EvalError(f"problem {pid!r} has an image; pass --images")
        queries.append(Query(pid, instruction(p, with_image=bool(images), letter_prompt=letter_prompt), images))
    preds = predict(generator, queries, out_dir, settings, desc=f"scienceqa/{split}",
                    signature={"task": "scienceqa", "model": model_name, "split": split})
    metrics, rows = score(problems, {pid: r["text"] for pid, r in preds.items()})
    metrics.update(model=model_name, split=split, format="QCM-A (letter prompt)" if letter_prompt else "QCM-LEA")
    finish_predictions(out_dir, [{**preds[r["question_id"]], **r} for r in rows])
    write_report(out_dir, metrics, title=f"ScienceQA ({split})", summary=_summary(metrics),
                 sections=[_paper_row(metrics), _failed_section(metrics, preds)])
    return metrics


def _summary(m: dict) -> list[tuple[str, str]]:
    return [("accuracy", f"{pct(m['accuracy'])}%"), ("questions", str(m["count"])),
            ("correct", str(m["correct"])), ("unparseable (counted wrong)", str(m["failed_count"]))]


def _paper_row(m: dict) -> str:
    header = [name for _, name in PAPER_COLUMNS] + ["Avg"]
    row = [pct(m["by"][g][name]["accuracy"]) for g, name in PAPER_COLUMNS] + [pct(m["accuracy"])]
    return "## As in the paper's table\n\n" + markdown_table(header, [row])


def _failed_section(m: dict, preds: dict[str, dict], show: int = 50) -> str:
    if not m["failed"]:
        return "## Unparseable answers\n\nNone."
    rows = [[pid, preds[pid]["text"][:160]] for pid in m["failed"][:show]]
    more = f"\n\n({len(m['failed']) - show} more in metrics.json)" if len(m["failed"]) > show else ""
    return "## Unparseable answers (counted wrong)\n\n" + markdown_table(["problem", "reply"], rows) + more
