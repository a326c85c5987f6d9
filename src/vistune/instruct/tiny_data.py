"""The tiny offline training set of the tiny-cpu presets, tests and benchmarks, drawn from
the synthetic world (`synth`) with one object per scene.

Stage-1 records caption each image (``plain`` template); stage-2 records ask about its
object's colour, shape and position, with a few text-only and detailed-description
records for a LLaVA-like mix. Answers stay a short sentence, so the tiny presets' short
``data.max_length`` keeps them. A small BPE tokenizer trained on the texts comes along,
because a from-scratch tiny LLM needs one.

    DIR/images/*.png  DIR/annotations.json  DIR/pretrain.jsonl  DIR/instruct.jsonl  DIR/tokenizer/
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from ..data.records import write_records
from ..text.templates import IMAGE_PLACEHOLDER
from ..text.tokenizer import train_bpe_tokenizer
from .annotations import ImageAnnotation
from .synth import WorldConfig, location_phrase, make_world, name

# Words the chat templates use, so their system prompts tokenize compactly.
TEMPLATE_WORDS = ["A chat between a curious human and an artificial intelligence assistant.",
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.",
                  "Human: Assistant: USER: ASSISTANT: ###"]


def _turns(q: str, a: str, image: bool) -> list[dict]:
    return [{"from": "human", "value": (f"{IMAGE_PLACEHOLDER}\n" if image else "") + q}, {"from": "gpt", "value": a}]


def tiny_question(ann: ImageAnnotation, kind: int) -> tuple[str, str]:
    """Question and answer of kind ``kind`` (0 colour, 1 shape, 2 position, 3 detail) about the one object."""
    b = ann.boxes[0]
    color, shape, size = b.attributes["color"], b.attributes["shape"], b.attributes["size"]
    where = location_phrase(b, ann.width, ann.height)
    if kind == 0:
        return "What color is the shape?", f"The shape is {color}."
    if kind == 1:
        return "What shape is in the image?", f"It is a {shape}."
    if kind == 2:
        return "Where is the shape?", f"The {shape} is {where}."
    return "Describe the image in detail.", (
        f"The image shows a single {size} {color} {shape} on a gray background. "
        f"The {shape} sits {where} of the picture, and nothing else is in the image. "
        f"Its color is {color} and its outline is sharp.")


def make_tiny_data(out_dir: str | os.PathLike, n_images: int = 48, seed: int = 0, image_size: int = 32,
                   vocab_size: int = 400) -> dict[str, Path]:
    """Write the tiny data set; returns the paths of its parts."""
    out = Path(out_dir)
    world = make_world(out, n_images, seed, WorldConfig.sized(image_size, min_objects=1, max_objects=1))
    pretrain, instruct = [], []
    for i, ann in enumerate(world):
        image = Path(ann.file).name  # records name images relative to DIR/images
        loc = location_phrase(ann.boxes[0], ann.width, ann.height)
        pretrain.append({"id": f"cap-{i}", "image": image, "conversations": _turns(
            "Describe the image briefly.", f"a {name(ann.boxes[0])} {loc}.", True)})
        instruct.append({"id": f"qa-{i}", "image": image, "conversations": _turns(*tiny_question(ann, i % 4), True)})
    rng = random.Random(seed)
    for j in range(max(2, n_images // 8)):  # text-only records, as in LLaVA's mix
        a, b = rng.randint(1, 5), rng.randint(1, 4)
        instruct.append({"id": f"text-{j}", "conversations": _turns(f"What is {a} plus {b}?",
                                                                   f"{a} plus {b} is {a + b}.", False)})
    rng.shuffle(instruct)
    write_records(pretrain, out / "pretrain.jsonl")
    write_records(instruct, out / "instruct.jsonl")
    texts = [t["value"].replace(f"{IMAGE_PLACEHOLDER}\n", "") for r in pretrain + instruct for t in r["conversations"]]
    tok = train_bpe_tokenizer(texts * 4 + TEMPLATE_WORDS * 4, vocab_size=vocab_size)
    tok.save_pretrained(str(out / "tokenizer"))
    return {"dir": out, "images": out / "images", "pretrain": out / "pretrain.jsonl",
            "instruct": out / "instruct.jsonl", "tokenizer": out / "tokenizer"}
