"""Shared by the evaluation tests: a scripted generator, official-schema fixtures, and a
tiny saved model for end-to-end runs through the real Engine."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import make_model, noise_image


@dataclass
class FakeCompletion:
    text: str
    prompt_tokens: int = 3
    completion_tokens: int = 2
    finish_reason: str = "stop"


class ScriptedGenerator:
    """Answers each prompt with `answer(text, images)`; records every batch it saw."""

    def __init__(self, answer: Callable[[str, list], str]):
        self.answer = answer
        self.batches: list[list[str]] = []
        self.configs: list = []

    def generate(self, prompts, config):
        self.batches.append([p.turns[-1]["value"] for p in prompts])
        self.configs.append(config)
        return [FakeCompletion(self.answer(p.turns[-1]["value"], p.images)) for p in prompts]

    @property
    def calls(self) -> int:
        return sum(len(b) for b in self.batches)


def problem(question: str, choices: list[str], answer: int, *, hint: str = "", image: str | None = None,
            subject: str = "natural science", grade: str = "grade3", lecture: str = "A lecture.",
            solution: str = "A solution.") -> dict:
    """A problem in ScienceQA's official problems.json schema (all its fields)."""
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": grade, "subject": subject, "topic": "topic", "category": "category",
            "skill": "skill", "lecture": lecture, "solution": solution, "split": "test"}


def write_scienceqa(root: Path, problems: dict[str, dict], splits: dict[str, list[str]]) -> tuple[Path, Path, Path]:
    """problems.json, pid_splits.json and images/<split>/<pid>/image.png for illustrated ones."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    images = root / "images"
    for split, pids in splits.items():
        for k, pid in enumerate(pids):
            if problems[pid].get("image"):
                d = images / split / pid
                d.mkdir(parents=True, exist_ok=True)
                noise_image(k, (40, 30)).save(d / problems[pid]["image"])
    return root / "problems.json", root / "pid_splits.json", images


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(names):
        noise_image(k).save(folder / n)
    return folder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny model saved the way `vistune` saves models; answers are noise, but every
    piece of the real Engine runs."""
    from vistune.model.checkpoint import save_model

    model, tok = make_model(tokenizer)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model, tok, path)
    return path
