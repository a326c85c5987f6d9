"""The rules backend: instruction data of the three kinds from symbolic scenes.

For worlds whose boxes carry attributes (colour, shape, size), answers are computed
from the annotations, so every one is true of its scene. Phrasing varies through
seeded random choices; the same seed gives the same data.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from ..text.templates import IMAGE_PLACEHOLDER
from .annotations import Box, ImageAnnotation
from .instructions import DETAIL_INSTRUCTIONS
from .synth import COLORS, SHAPES, horizontal, location_phrase, name, number_word, phrase, vertical

KINDS = ("conversation", "detail", "reasoning")  # LLaVA-Instruct's; BUILDERS also has "referring" and "vqa"
SHORT_SUFFIX = "Answer the question using a single word or phrase."
QUESTION_KINDS = ("color", "shape", "count", "existence", "position", "size")


class RulesError(ValueError):
    pass


@dataclass
class QA:
    kind: str
    question: str
    short: str
    long: str


def _attrs(ann: ImageAnnotation) -> list[Box]:
    for b in ann.boxes:
        missing = {"color", "shape", "size"} - set(b.attributes)
        if missing:
            raise RulesError(
                f"image {ann.id!r}: box {b.category!r} lacks attributes {sorted(missing)}; the rules backend "
                "needs symbolic attributes (use --backend openai for plain captions and boxes)"
            )
    return ann.boxes


def _plural(shape: str) -> str:
    return shape + "s"


def _unique_by(boxes: list[Box], attribute: str) -> list[Box]:
    """Boxes that are the only one with their value of ``attribute`` (so it names them)."""
    values = [b.attributes[attribute] for b in boxes]
    return [b for b in boxes if values.count(b.attributes[attribute]) == 1]


# -- one question per kind --------------------------------------------------------
def q_color(boxes: list[Box], ann: ImageAnnotation, rng: random.Random) -> QA | None:
    unique = _unique_by(boxes, "shape")
    if not unique:
        return None
    b = rng.choice(unique)
    s, c = b.attributes["shape"], b.attributes["color"]
    q = rng.choice([f"What color is the {s}?", f"Which color does the {s} have?", f"What is the color of the {s}?"])
    return QA("color", q, c, rng.choice([f"The {s} is {c}.", f"It is {c}.", f"The {s} in the image is {c}."]))


def q_shape(boxes: list[Box], ann: ImageAnnotation, rng: random.Random) -> QA | None:
    unique = _unique_by(boxes, "color")
    if not unique:
        return None
    b = rng.choice(unique)
    s, c = b.attributes["shape"], b.attributes["color"]
    q = rng.choice([f"What shape is the {c} object?", f"Which shape is {c}?", f"What is the shape of the {c} object?"])
    return QA("shape", q, s, rng.choice([f"The {c} object is a {s}.", f"It is a {s}.", f"The {c} shape is a {s}."]))


def q_count(boxes: list[Box], ann: ImageAnnotation, rng: random.Random) -> QA | None:
    n = len(boxes)
    if rng.random() < 0.6:
        q = rng.choice(["How many objects are there?", "How many shapes can you see?",
                        "How many objects are in the image?", "Count the shapes in the picture."])
        verb = "is" if n == 1 else "are"
        noun = "object" if n == 1 else "objects"
        return QA("count", q, number_word(n), f"There {verb} {number_word(n)} {noun}.")
    s = rng.choice([b.attributes["shape"] for b in boxes])
    k = sum(b.attributes["shape"] == s for b in boxes)
    verb, noun = ("is", s) if k == 1 else ("are", _plural(s))
    return QA("count", f"How many {_plural(s)} are there?", number_word(k), f"There {verb} {number_word(k)} {noun}.")


def q_existence(boxes: list[Box], ann: ImageAnnotation, rng: random.Random) -> QA | None:
    present = {(b.attributes["color"], b.attributes["shape"]) for b in boxes}
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
        ans = "yes"
    else:
        # Absent objects that share a colour or a shape with a present one: the model
        # has to bind attributes, not just spot a colour.
        near = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present
                and any(c == pc or s == ps for pc, ps in present)]
        c, s = rng.choice(near)
        ans = "no"
    q = rng.choice([f"Is there a {c} {s} in the image?", f"Do you see a {c} {s}?", f"Is there a {c} {s}?"])
    long = f"Yes, there is a {c} {s}." if ans == "yes" else f"No, there is no {c} {s}."
    return QA("existence", q, ans, long)


def q_position(boxes: list[Box], ann: ImageAnnotation, rng: random.Random) -> QA | None:
    pairs = [(a, b) for a in boxes for b in boxes if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        dx = (a.center[0] - b.center[0]) / ann.width
        dy = (a.center[1] - b.center[1]) / ann.height
        if abs(dx) >= 0.2 and rng.random() < 0.6:
            side = "left" if dx < 0 else "right"
            q = f"Is the {name(a)} to the left or to the right of the {name(b)}?"
            return QA("position", q, side, f"The {name(a)} is to the {side} of the {name(b)}.")
        if abs(dy) >= 0.2:
            side = "above" if dy < 0 else "below"
            q = f"Is the {name(a)} above or below the {name(b)}?"
            return QA("position", q, side, f"The {name(a)} is {side} the {name(b)}.")
    return None


def q_size(boxes: list[Box], ann: ImageAnnotation, rng: random.Random) -> QA | None:
    b = rng.choice(boxes)
    sz = b.attributes["size"]
    q = rng.choice([f"Is the {name(b)} small or large?", f"How big is the {name(b)}, small or large?"])
    return QA("size", q, sz, f"The {name(b)} is {sz}.")


GENERATORS: dict[str, Callable[[list[Box], ImageAnnotation, random.Random], QA | None]] = {
    "color": q_color, "shape": q_shape, "count": q_count,
    "existence": q_existence, "position": q_position, "size": q_size,
}


def ask(kind: str, ann: ImageAnnotation, rng: random.Random) -> QA | None:
    return GENERATORS[kind](_attrs(ann), ann, rng)


def _with_image(text: str, rng: random.Random) -> str:
    # LLaVA puts the image before or after the first question at random.
    return f"{IMAGE_PLACEHOLDER}\n{text}" if rng.random() < 0.5 else f"{text}\n{IMAGE_PLACEHOLDER}"


def _capital(s: str) -> str:
    return s[:1].upper() + s[1:]


# -- the three kinds --------------------------------------------------------------
def _qa_turns(qas: list[QA], rng: random.Random, short_ratio: float) -> list[dict]:
    turns: list[dict] = []
    for i, qa in enumerate(qas):
        if rng.random() < short_ratio:
            q, a = f"{qa.question}\n{SHORT_SUFFIX}", _capital(qa.short)
        else:
            q, a = qa.question, qa.long
        turns.append({"from": "human", "value": _with_image(q, rng) if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


def _one_per_kind(ann: ImageAnnotation, rng: random.Random) -> list[QA]:
    kinds = list(QUESTION_KINDS)
    rng.shuffle(kinds)
    return [qa for k in kinds if (qa := ask(k, ann, rng)) is not None]


def conversation(ann: ImageAnnotation, rng: random.Random, short_ratio: float = 0.5) -> list[dict]:
    return _qa_turns(_one_per_kind(ann, rng)[: rng.randint(4, 6)], rng, short_ratio)


def vqa(ann: ImageAnnotation, rng: random.Random) -> list[dict]:
    """Every question kind once, each answered in a word after LLaVA-1.5's format prompt, as the
    academic VQA sets (VQAv2, GQA) in LLaVA-1.5's mix. Not one of LLaVA-Instruct's kinds."""
    return _qa_turns(_one_per_kind(ann, rng), rng, short_ratio=1.0)


def describe(ann: ImageAnnotation, rng: random.Random) -> str:
    boxes = sorted(_attrs(ann), key=lambda b: b.center[0])
    n = len(boxes)
    head = rng.choice([
        f"The image shows {number_word(n)} {'object' if n == 1 else 'objects'} on a plain gray background.",
        f"This is a simple picture with {number_word(n)} {'shape' if n == 1 else 'shapes'} on gray.",
        f"The picture holds {number_word(n)} {'shape' if n == 1 else 'shapes'} on gray.",
    ])
    # No opening like "There are four ...": that is how a count answer begins ("There are four
    # objects."), and a model that met both would answer "describe the image" with the count
    # sentence and stop
    parts = [head]
    for i, b in enumerate(boxes):
        loc = location_phrase(b, ann.width, ann.height)
        opener = rng.choice(["There is", "I can see", "The image contains"]) if i == 0 else rng.choice(
            ["There is also", "Next, there is", "In addition, there is"])
        parts.append(f"{opener} a {phrase(b, rng, with_size=True)} {loc}.")
    if n > 1:
        largest = [b for b in boxes if b.attributes["size"] == "large"]
        if largest and len(largest) < n:
            parts.append(f"The large {'shape is' if len(largest) == 1 else 'shapes are'} "
                         f"{' and '.join('the ' + name(b) for b in largest)}.")
    return " ".join(parts)


def detail(ann: ImageAnnotation, rng: random.Random) -> list[dict]:
    return [{"from": "human", "value": _with_image(rng.choice(DETAIL_INSTRUCTIONS), rng)},
            {"from": "gpt", "value": describe(ann, rng)}]


def reasoning(ann: ImageAnnotation, rng: random.Random) -> list[dict]:
    boxes = _attrs(ann)
    n = len(boxes)
    listing = ", ".join(f"a {name(b)}" for b in boxes)
    options: list[tuple[str, str]] = []
    if n >= 2:
        gone = rng.choice(boxes)
        left = n - 1
        options.append((
            f"If the {name(gone)} were taken away, how many objects would remain?",
            f"First I count the objects: {listing}, which makes {number_word(n)}. Taking away the {name(gone)} "
            f"removes one of them, so {number_word(left)} {'object remains' if left == 1 else 'objects remain'}.",
        ))
        top = min(boxes, key=lambda b: b.center[1])
        others = [b for b in boxes if b is not top]
        if all(b.center[1] - top.center[1] >= 0.1 * ann.height for b in others):
            options.append((
                "Which object is closest to the top of the image?",
                f"Comparing the vertical positions, the {name(top)} sits {location_phrase(top, ann.width, ann.height)}, "
                f"higher than the {', the '.join(name(b) for b in others)}. So the {name(top)} is closest to the top.",
            ))
        big = [b for b in boxes if b.attributes["size"] == "large"]
        small = [b for b in boxes if b.attributes["size"] == "small"]
        if len(big) != len(small):
            more = "large" if len(big) > len(small) else "small"
            options.append((
                "Are there more large objects or more small objects?",
                f"The large objects are {number_word(len(big))} and the small ones are {number_word(len(small))}. "
                f"Since {max(len(big), len(small))} is more than {min(len(big), len(small))}, there are more {more} objects.",
            ))
    target = rng.choice(boxes)
    new_color = rng.choice([c for c in COLORS if c != target.attributes["color"]])
    already = sum(b.attributes["color"] == new_color for b in boxes)
    total = already + 1
    options.append((
        f"Suppose the {name(target)} were repainted {new_color}. How many {new_color} objects would there be then?",
        f"Right now there {'is' if already == 1 else 'are'} {number_word(already)} {new_color} "
        f"{'object' if already == 1 else 'objects'}. Repainting the {name(target)} adds one more, so there would be "
        f"{number_word(total)} {new_color} {'object' if total == 1 else 'objects'}.",
    ))
    q, a = rng.choice(options)
    return [{"from": "human", "value": _with_image(q, rng)}, {"from": "gpt", "value": a}]


def _place(b: Box, w: int, h: int) -> str:
    hz, vt = horizontal(b, w), vertical(b, h)
    return " ".join(x for x in (vt, hz) if x not in ("center", "middle")) or "center"


def referring(ann: ImageAnnotation, rng: random.Random, max_turns: int = 6) -> list[dict]:
    """Questions that name one object and ask for one attribute, answered as the object's
    name followed at once by the attribute ("circle red" for the circle's colour). Not one of
    LLaVA-Instruct's kinds; like the region-level data in LLaVA-1.5's mix.

    A tiny LM from scratch learns to look an object up in the image tokens when the word
    that names it is the token it is reading, within a couple of hundred steps; reading the
    name from a question several tokens back, as a one-word answer needs, it does not learn
    in the demo's budget. Training on both, the lookup learnt here carries over to the
    one-word answers.
    """
    boxes = _attrs(ann)
    unique_shape, unique_color = _unique_by(boxes, "shape"), _unique_by(boxes, "color")
    names = [name(b) for b in boxes]
    qas: list[tuple[str, str]] = []
    for b in boxes:
        s, c = b.attributes["shape"], b.attributes["color"]
        if b in unique_shape:
            qas.append((rng.choice([f"Name the {s} and its color.", f"Which {s} is it, by color?"]), f"{s} {c}"))
        if b in unique_color:
            qas.append((rng.choice([f"Name the {c} object and its shape.", f"Which {c} shape is it?"]), f"{c} {s}"))
        if names.count(name(b)) == 1:
            qas.append((f"Name the {name(b)} and its size.", f"{name(b)} {b.attributes['size']}"))
            qas.append((f"Name the {name(b)} and its place.", f"{name(b)} {_place(b, ann.width, ann.height)}"))
    rng.shuffle(qas)
    turns: list[dict] = []
    for i, (q, a) in enumerate(qas[:max_turns]):
        turns.append({"from": "human", "value": _with_image(q, rng) if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


BUILDERS = {"conversation": conversation, "detail": detail, "reasoning": reasoning, "referring": referring, "vqa": vqa}


def generate_records(annotations: Iterable[ImageAnnotation], kinds: Iterable[str] = KINDS, seed: int = 0) -> list[dict]:
    """LLaVA records (dicts with id, image, conversations, kind), deterministic under ``seed``."""
    kinds = list(kinds)
    bad = [k for k in kinds if k not in BUILDERS]
    if bad or not kinds:
        raise RulesError(f"unknown instruction kinds {bad}; known: {', '.join(BUILDERS)}" if bad
                         else f"no instruction kind given; known: {', '.join(BUILDERS)}")
    out = []
    for ann in annotations:
        for kind in kinds:
            rng = random.Random(f"{seed}/{ann.id}/{kind}")
            out.append({"id": f"{ann.id}-{kind}", "image": ann.file, "kind": kind,
                        "conversations": BUILDERS[kind](ann, rng)})
    return out


def generate_mix(annotations: Sequence[ImageAnnotation], mix: Mapping[str, float], seed: int = 0) -> list[dict]:
    """Records in proportions: ``mix[kind]`` records of that kind per image on average (2.0: two
    per image, written with different seeds; 0.25: one for a quarter of the images). Shuffled,
    deterministic under ``seed``."""
    bad = {k: w for k, w in mix.items() if not (w >= 0)}
    if bad:
        raise RulesError(f"mix weights must be >= 0: {bad}")
    annotations = list(annotations)
    out: list[dict] = []
    for kind, weight in mix.items():
        whole, part = int(weight), weight - int(weight)
        for r in range(whole + (part > 0)):
            # The fraction picks its images first: each record depends only on its image and the seed.
            images = annotations if r < whole else random.Random(f"{seed}/{kind}/{r}").sample(
                annotations, round(len(annotations) * part))
            records = generate_records(images, kinds=[kind], seed=seed + 1000 * r)
            out += [{**x, "id": f"{x['id']}-{r}"} if r else x for x in records]
    if not out:
        raise RulesError(f"the mix {dict(mix)} makes no records")
    random.Random(seed).shuffle(out)
    return out


def short_answer_questions(annotations: Iterable[ImageAnnotation], seed: int = 0,
                           kinds: Iterable[str] = QUESTION_KINDS) -> list[dict]:
    """One short-answer question per kind and image (for evaluation): question lines in
    `vistune predict` format plus ``answer`` and ``kind``."""
    out = []
    for ann in annotations:
        for kind in kinds:
            rng = random.Random(f"eval/{seed}/{ann.id}/{kind}")
            qa = ask(kind, ann, rng)
            if qa is None:
                continue
            out.append({"question_id": f"{ann.id}-{kind}", "image": ann.file, "kind": kind,
                        "text": f"{qa.question}\n{SHORT_SUFFIX}", "answer": qa.short})
    return out
