"""The demo's evaluation on held-out scenes, through `vistune.eval`.

The short-answer questions (one per kind and scene) are a VQA task with one reference
each, run and graded by eval's VQA task: normalised exact match, per kind (the question
type), and the share of answers that start with the expected one ("Blue No No No" is
right but did not stop: a model can lose the format on a blank image and still guess
the answer from the question). Detailed descriptions are graded by object recall, the
one measure of the demo's own: the share of a scene's objects that its description
names, with the colour before or after the shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from ..eval import vqa
from ..eval.normalize import normalize_answer
from ..eval.runner import PREDICTIONS, Generator, Query, RunSettings, predict, read_jsonl
from ..files import atomic_path, write_jsonl
from ..instruct.annotations import ImageAnnotation
from ..instruct.synth import name, phrasings

BLANK = "blank.png"
BLANK_COLOR = (122, 116, 104)  # the text-only ablation's image: the world's mean colour, nothing in it


def vqa_questions(questions: Sequence[dict]) -> list[dict]:
    """The rules backend's short-answer questions as VQA question lines: the answer is the one
    reference, the kind the question type."""
    return [{"question_id": q["question_id"], "image": q["image"], "text": q["text"], "answers": [q["answer"]],
             "question_type": q["kind"]} for q in questions]


def write_blank_questions(questions: Sequence[dict], out_dir: Path, size: int) -> Path:
    """The same questions, each asked about one blank image (``out_dir/blank.png``): the text-only
    ablation. Returns the question file, whose images are in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / BLANK) as tmp:
        Image.new("RGB", (size, size), BLANK_COLOR).save(tmp, format="PNG")
    return write_jsonl(out_dir / "questions_blank_image.jsonl", [{**q, "image": BLANK} for q in questions])


def answer_questions(engine: Generator, questions_file: Path, image_dir: Path, out_dir: Path, model_name: str,
                     *, batch_size: int = 32, max_new_tokens: int = 6) -> tuple[dict, list[dict]]:
    """eval's VQA task on one model: its metrics (also in ``out_dir``: metrics.json, report.md, a
    chart) and one sample per question (question, answer, expected, correct)."""
    settings = RunSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=0.0, overwrite=True)
    metrics = vqa.evaluate(engine, questions_file, image_dir, out_dir, settings, suffix=None, model_name=model_name)
    preds = {p["question_id"]: p for p in read_jsonl(Path(out_dir) / PREDICTIONS)}
    samples = [{"question_id": q["question_id"], "kind": q["question_type"], "question": q["text"],
                "answer": preds[q["question_id"]]["text"], "expected": q["answers"][0],
                "correct": preds[q["question_id"]]["exact_match"]}
               for q in read_jsonl(questions_file)]
    return metrics, samples


def object_recall(engine: Generator, anns: Sequence[ImageAnnotation], image_root: Path, out_dir: Path,
                  instruction: str = "Describe this image in detail.", max_new_tokens: int = 96,
                  batch_size: int = 16) -> tuple[float, list[dict]]:
    """Fraction of objects (colour and shape, in any of `phrasings`) that the detailed descriptions
    name; the descriptions are made by eval's runner (``out_dir/predictions.jsonl``)."""
    queries = [Query(a.id, instruction, [Path(image_root) / a.file]) for a in anns]
    settings = RunSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=0.0, overwrite=True,
                           progress=False)
    preds = predict(engine, queries, out_dir, settings, signature={"task": "object_recall"}, desc="descriptions")
    found = total = 0
    samples = []
    for a in anns:
        description = preds[a.id]["text"]
        text = normalize_answer(description)
        # In any of the forms the training descriptions use ("red circle", "circle in red").
        hit = sum(any(normalize_answer(p) in text for p in phrasings(b)) for b in a.boxes)
        found += hit
        total += len(a.boxes)
        samples.append({"image": a.file, "description": description, "objects": [name(b) for b in a.boxes],
                        "recalled": hit})
    return found / max(1, total), samples
