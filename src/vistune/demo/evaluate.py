"""Grading the demo's models on held-out scenes.

Short-answer questions (one per kind and scene) are graded by exact match after
light normalisation; detailed descriptions by object recall (the fraction of the
scene's objects named in the description, with the colour before or after the shape).

Exact match also fails an answer whose first word is right but which does not stop
("Blue No No No"). The first-word accuracy beside it separates the two: a model can
lose the format on a blank image and still guess the answer from the question.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..infer.engine import Engine, GenerationConfig, Prompt
from ..instruct.annotations import ImageAnnotation
from ..instruct.synth import name, phrasings

_PUNCT = re.compile(r"[^\w\s]")


def normalize(ans: str) -> str:
    return " ".join(_PUNCT.sub(" ", ans.lower()).split())


@dataclass
class Graded:
    accuracy: float
    by_kind: dict[str, float]
    n: int
    first_word: float = 0.0  # answers whose first word is the expected one-word answer
    samples: list[dict] = field(default_factory=list)


def _images(paths: Sequence[str], root: Path, blank: bool, size: int) -> list[Image.Image]:
    if blank:
        # Text-only ablation: the image is replaced by a mean-coloured one.
        return [Image.new("RGB", (size, size), (122, 116, 104)) for _ in paths]
    return [Image.open(root / p).convert("RGB") for p in paths]


def answer_questions(engine: Engine, questions: Sequence[dict], image_root: Path, *, blank: bool = False,
                     batch_size: int = 32, max_new_tokens: int = 6, progress=None) -> list[str]:
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    size = engine.loaded.image_config.size
    out: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        prompts = [Prompt.ask(q["text"], _images([q["image"]], image_root, blank, size)) for q in chunk]
        out.extend(c.text for c in engine.generate(prompts, cfg))
        if progress:
            progress(len(chunk))
    return out


def grade(questions: Sequence[dict], answers: Sequence[str]) -> Graded:
    hits: dict[str, list[int]] = defaultdict(list)
    first = 0
    samples = []
    for q, a in zip(questions, answers):
        got, expected = normalize(a), normalize(q["answer"])
        ok = int(got == expected)
        want = expected.split()
        first += got.split()[: len(want)] == want
        hits[q["kind"]].append(ok)
        samples.append({"question_id": q["question_id"], "kind": q["kind"], "question": q["text"],
                        "answer": a, "expected": q["answer"], "correct": bool(ok)})
    allv = [v for vs in hits.values() for v in vs]
    return Graded(sum(allv) / max(1, len(allv)), {k: sum(v) / len(v) for k, v in sorted(hits.items())},
                  len(allv), first / max(1, len(allv)), samples)


def majority_baseline(questions: Sequence[dict]) -> dict[str, float]:
    """Accuracy of always giving the most frequent answer of each question kind."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for q in questions:
        counts[q["kind"]][normalize(q["answer"])] += 1
    per = {k: max(c.values()) / sum(c.values()) for k, c in sorted(counts.items())}
    total = sum(sum(c.values()) for c in counts.values())
    per["overall"] = sum(max(c.values()) for c in counts.values()) / max(1, total)
    return per


def object_recall(engine: Engine, anns: Sequence[ImageAnnotation], image_root: Path,
                  instruction: str = "Describe this image in detail.", max_new_tokens: int = 96,
                  batch_size: int = 16) -> tuple[float, list[dict]]:
    """Fraction of objects (colour and shape, in any of `phrasings`) that the detailed descriptions name."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    found = total = 0
    samples = []
    for start in range(0, len(anns), batch_size):
        chunk = anns[start:start + batch_size]
        prompts = [Prompt.ask(instruction, [Image.open(image_root / a.file).convert("RGB")]) for a in chunk]
        for a, c in zip(chunk, engine.generate(prompts, cfg)):
            text = normalize(c.text)
            # In any of the forms the training descriptions use ("red circle", "circle in red").
            hit = sum(any(normalize(p) in text for p in phrasings(b)) for b in a.boxes)
            found += hit
            total += len(a.boxes)
            samples.append({"image": a.file, "description": c.text, "objects": [name(b) for b in a.boxes],
                            "recalled": hit})
    return found / max(1, total), samples
