"""A tiny, fully offline training set for the tiny-cpu presets, tests and benchmarks.

Images are one coloured shape on a light background; stage-1 records caption them
(``plain`` template), stage-2 records ask about colour, shape and position, with a
few text-only and long-description records for a LLaVA-like mix. A small BPE
tokenizer trained on the texts comes along, because a from-scratch tiny LLM needs
one.

    DIR/images/*.png  DIR/pretrain.jsonl  DIR/instruct.jsonl  DIR/tokenizer/
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..data.records import write_records
from ..text.tokenizer import train_bpe_tokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 60, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": 0.3, "center": 0.5, "right": 0.7}


def draw(color: str, shape: str, place: str, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    cx, cy, r = PLACES[place] * size, size / 2, size * 0.22
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _turns(q: str, a: str, image: bool) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


def make_tiny_data(out_dir: str | os.PathLike, n_images: int = 48, seed: int = 0, image_size: int = 32,
                   vocab_size: int = 400) -> dict[str, Path]:
    """Write the tiny data set; returns the paths of its parts."""
    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pretrain, instruct = [], []
    for i in range(n_images):
        color, shape, place = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        name = f"img_{i:04d}.png"
        draw(color, shape, place, image_size).save(out / "images" / name)
        pretrain.append({"id": f"cap-{i}", "image": name, "conversations": _turns(
            "Describe the image briefly.", f"a {color} {shape} on the {place}.", True)})
        kind = i % 4
        if kind == 0:
            q, a = "What color is the shape?", f"The shape is {color}."
        elif kind == 1:
            q, a = "What shape is in the image?", f"It is a {shape}."
        elif kind == 2:
            q, a = "Where is the shape?", f"The {shape} is on the {place}."
        else:
            q = "Describe the image in detail."
            a = (f"The image shows a single {color} {shape} on a light grey background. "
                 f"The {shape} sits on the {place} side of the picture, and nothing else is in the image. "
                 f"Its color is {color} and its outline is sharp.")
        instruct.append({"id": f"qa-{i}", "image": name, "conversations": _turns(q, a, True)})
    for j in range(max(2, n_images // 8)):  # text-only records, as in LLaVA's mix
        a, b = rng.randint(1, 5), rng.randint(1, 4)
        instruct.append({"id": f"text-{j}", "conversations": _turns(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.",
                                                                   False)})
    rng.shuffle(instruct)
    write_records(pretrain, out / "pretrain.jsonl")
    write_records(instruct, out / "instruct.jsonl")
    texts = [t["value"].replace("<image>\n", "") for r in pretrain + instruct for t in r["conversations"]]
    tok = train_bpe_tokenizer(texts * 4 + _extra_words(), vocab_size=vocab_size)
    tok.save_pretrained(str(out / "tokenizer"))
    return {"dir": out, "images": out / "images", "pretrain": out / "pretrain.jsonl",
            "instruct": out / "instruct.jsonl", "tokenizer": out / "tokenizer"}


def _extra_words() -> list[str]:
    # Words the chat templates use, so their system prompts tokenize compactly.
    return ["A chat between a curious human and an artificial intelligence assistant.",
            "The assistant gives helpful, detailed, and polite answers to the human's questions.",
            "Human: Assistant: USER: ASSISTANT: ###"] * 4
