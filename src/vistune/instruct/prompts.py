"""What the text-only LLM is asked, and how its answer is read back.

Per kind: one system message and hand-written few-shot examples (context -> output),
in vistune's own wording. The LLM never sees pixels, only `symbolic_context`:
``conversation`` gets the captions alone, ``detail`` and ``reasoning`` also get the
boxes. Outputs come back in one plain format that is easy to check::

    Question:
    ...
    ===
    Answer:
    ...
    ===

(``detail`` is plain prose: its question is drawn from `DETAIL_INSTRUCTIONS`.)
`parse_completion` turns a completion into (question, answer) pairs or raises
`CompletionError` with the reason it cannot be used as training data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..text.templates import IMAGE_PLACEHOLDER
from .annotations import ImageAnnotation, symbolic_context

KINDS = ("conversation", "detail", "reasoning")


class CompletionError(ValueError):
    """A completion that must not become data; `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class PromptSpec:
    kind: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, output) few-shot pairs
    with_boxes: bool


# --- few-shot contexts: two scenes, written for vistune -----------------------------------

_MARKET_CAPTIONS = """A woman sells fruit from a wooden cart on a busy street.
Bananas, oranges and apples are piled high on a cart at an outdoor market.
A street vendor stands beside her fruit stand while people walk past.
A fruit cart parked on the sidewalk next to a bicycle.
Shoppers pass a colorful fruit stall in the city."""

_MARKET_BOXES = """person: [0.412, 0.205, 0.598, 0.912]
banana: [0.102, 0.480, 0.244, 0.561]
orange: [0.251, 0.502, 0.330, 0.577]
orange: [0.262, 0.431, 0.339, 0.505]
apple: [0.318, 0.512, 0.389, 0.590]
bicycle: [0.701, 0.553, 0.982, 0.941]
person: [0.845, 0.121, 0.951, 0.803]"""

_KITCHEN_CAPTIONS = """A brown dog lies on the kitchen floor next to its food bowl.
A kitchen with white cabinets and a dog resting on the tiles.
A sleepy dog stretched out in front of an oven.
A dog naps near a bowl in a bright kitchen.
A large dog lying on a tiled floor in a home kitchen."""

_KITCHEN_BOXES = """dog: [0.183, 0.602, 0.671, 0.889]
bowl: [0.702, 0.781, 0.813, 0.850]
oven: [0.355, 0.211, 0.640, 0.598]
refrigerator: [0.003, 0.015, 0.207, 0.880]"""


def _qa(*pairs: str) -> str:
    out = []
    for i, text in enumerate(pairs):
        out.append(("Question:\n" if i % 2 == 0 else "Answer:\n") + text.strip() + "\n===")
    return "\n".join(out)


CONVERSATION = PromptSpec(
    kind="conversation",
    with_boxes=False,
    system=(
        "You write training data for an assistant that can see images. You get a few captions "
        "written by different people about one image. You cannot see the image yourself: take the "
        "captions as what is in it.\n\n"
        "Write a conversation between a person asking about the image and an assistant who is "
        "looking at it. Vary the questions: what the objects are, how many there are, what people "
        "or animals are doing, where things are, and how they relate to each other. Ask only what the "
        "captions answer with certainty. Add one or two questions that need everyday knowledge or "
        "reasoning about the scene, and answer those in more depth.\n\n"
        "The assistant speaks as someone seeing the picture: never mention captions, descriptions or "
        "what you were told. Write each question after a line 'Question:' and each answer after a line "
        "'Answer:', and end every question and every answer with a line '==='."
    ),
    examples=(
        (_MARKET_CAPTIONS, _qa(
            "What is the woman selling?",
            "She is selling fruit from a wooden cart: bananas, oranges and apples are stacked on it.",
            "Where is this happening?",
            "Outdoors, on a busy city sidewalk that works as a street market. People are walking past the stall.",
            "Is there a vehicle near the cart?",
            "Yes, a bicycle is parked on the sidewalk next to the fruit cart.",
            "Why might someone sell fruit from a cart instead of a shop?",
            "A cart costs little to run and can be moved to wherever customers are, such as busy sidewalks, "
            "markets or stations, without paying rent for a store. Fruit suits this way of selling: it needs no "
            "preparation, people buy it on the go, and a colorful pile of it draws the eye of passers-by.",
        )),
        (_KITCHEN_CAPTIONS, _qa(
            "What animal is in the picture?",
            "A large brown dog.",
            "What is the dog doing?",
            "It is lying stretched out on the tiled kitchen floor, resting or napping.",
            "What is next to the dog?",
            "Its food bowl sits on the floor beside it, and an oven is right behind it.",
            "Why might a dog like to lie in the kitchen?",
            "Kitchens are where people spend much of the day and where food is made, so a dog gets company and "
            "the chance of a treat there. Tiled floors also stay cool, which is comfortable for a big dog to lie on.",
        )),
    ),
)

DETAIL = PromptSpec(
    kind="detail",
    with_boxes=True,
    system=(
        "You write training data for an assistant that can see images. You get a few captions written "
        "by different people about one image, then a list of objects in it, one per line as "
        "'category: [x1, y1, x2, y2]'. The numbers are the object's box as fractions of the image width "
        "and height, from the top-left corner (0) to the bottom-right corner (1). You cannot see the image "
        "yourself: take the captions and the objects as what is in it.\n\n"
        "Write a detailed description of the image, as someone looking at it would. Cover what is there, "
        "how many of each thing, what is happening, and where things are relative to each other. Use the "
        "boxes to count objects and work out their positions, but never write coordinates or numbers taken "
        "from the boxes, and never mention captions, boxes or descriptions. Write plain prose in one to three "
        "paragraphs, without headings, lists or markers."
    ),
    examples=(
        (_MARKET_CAPTIONS + "\n\n" + _MARKET_BOXES,
         "The picture shows a street market on a busy city sidewalk. In the middle of the scene a woman stands "
         "beside a wooden cart piled with fruit. On the left part of the cart lies a bunch of bananas, with two "
         "oranges and an apple just to the right of them, all stacked close together.\n\n"
         "On the right side of the image a bicycle is parked on the sidewalk, and behind it another person is "
         "walking past the stall. The bright colors of the fruit stand out against the street, and the scene "
         "has the relaxed, everyday feel of an outdoor market."),
        (_KITCHEN_CAPTIONS + "\n\n" + _KITCHEN_BOXES,
         "A large brown dog lies stretched out across the lower half of a bright home kitchen, resting on the "
         "tiled floor. To its right, near the bottom edge of the picture, stands its food bowl. Behind the dog "
         "is an oven set into white cabinets, and a tall refrigerator fills the left edge of the image from "
         "top to bottom. The dog looks calm and sleepy, as if it has settled in for a nap where the family "
         "spends its time."),
    ),
)

REASONING = PromptSpec(
    kind="reasoning",
    with_boxes=True,
    system=(
        "You write training data for an assistant that can see images. You get a few captions written by "
        "different people about one image, then a list of objects in it, one per line as "
        "'category: [x1, y1, x2, y2]' with the box as fractions of the image width and height from the "
        "top-left corner. You cannot see the image yourself: take the captions and the objects as what is "
        "in it.\n\n"
        "Write one question about the image that takes reasoning or background knowledge to answer, not "
        "just naming what is visible: why something is the way it is, what might happen next, what a "
        "person should watch out for, or what the scene suggests. The question should not spell out details "
        "that the person asking can see anyway. Then write a detailed answer that first points to what in "
        "the image matters and then explains the reasoning step by step.\n\n"
        "Answer as someone seeing the picture: never mention captions, boxes, coordinates or descriptions. "
        "Write the question after a line 'Question:' and the answer after a line 'Answer:', and end each "
        "with a line '==='."
    ),
    examples=(
        (_MARKET_CAPTIONS + "\n\n" + _MARKET_BOXES, _qa(
            "What could make it hard for this seller to keep her goods in good shape through the day?",
            "She sells fresh fruit from an open cart on a sidewalk, so several things work against her. First, "
            "the fruit sits uncovered outdoors: sun and heat make bananas ripen and brown quickly, and the "
            "oranges and apples lose moisture. Second, the fruit is piled high, so the pieces at the bottom are "
            "pressed by the weight above and bruise easily. Third, the street is busy with people and bicycles "
            "passing close by, which brings dust and the risk of the cart being knocked. To cope, she would "
            "likely shade the cart, keep the piles low, and sell the ripest fruit first.",
        )),
        (_KITCHEN_CAPTIONS + "\n\n" + _KITCHEN_BOXES, _qa(
            "Is this a good spot for the dog to rest while someone is cooking?",
            "Not really. The dog is lying on the kitchen floor right in front of the oven, which is where a "
            "cook stands and walks while preparing food. Someone carrying a hot pan or a heavy pot could trip "
            "over a large dog there, hurting themselves and the dog, and hot food or grease could fall on it. "
            "Its bowl is next to it, which explains why it likes this place, but while the oven is in use it "
            "would be safer to move the dog, or its bowl, to a quieter corner away from the cooking area.",
        )),
    ),
)

PROMPTS: dict[str, PromptSpec] = {p.kind: p for p in (CONVERSATION, DETAIL, REASONING)}


def check_kinds(kinds: list[str]) -> list[str]:
    bad = [k for k in kinds if k not in PROMPTS]
    if bad:
        raise ValueError(f"unknown kind(s) {', '.join(map(repr, bad))}; choose from {', '.join(KINDS)}")
    if not kinds:
        raise ValueError(f"no kind given; choose from {', '.join(KINDS)}")
    return kinds


def build_messages(kind: str, ann: ImageAnnotation) -> list[dict]:
    """Chat messages for one request: system, few-shot (user, assistant) pairs, the new context."""
    spec = PROMPTS[kind]
    messages = [{"role": "system", "content": spec.system}]
    for context, output in spec.examples:
        messages.append({"role": "user", "content": context})
        messages.append({"role": "assistant", "content": output})
    messages.append({"role": "user", "content": symbolic_context(ann, with_boxes=spec.with_boxes)})
    return messages


# --- reading completions back -----------------------------------------------------------

_MARKER = re.compile(r"^[ \t]*\**[ \t]*(question|answer)[ \t]*\**[ \t]*:[ \t]*\**", re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^[ \t]*={3,}[ \t]*$", re.MULTILINE)
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i cannot|i can'?t|i can not|i'?m unable|i am unable|"
    r"i'?m not able|i am not able|i won'?t|as an ai)\b",
    re.IGNORECASE,
)
_AI_DISCLAIMER = re.compile(r"\bas an ai( language)? model\b", re.IGNORECASE)
# Numbers like 0.287 in the prose are box coordinates leaking from the context.
_COORDS = re.compile(r"\[\s*[01]\.\d{2,3}\s*,|\b0\.\d{3}\b")
_SOURCES = re.compile(r"\b(captions?|bounding box(es)?|coordinates)\b", re.IGNORECASE)


def _check_text(text: str, what: str) -> None:
    if not text:
        raise CompletionError(f"empty {what}")
    if IMAGE_PLACEHOLDER in text:
        raise CompletionError(f"{what} contains the {IMAGE_PLACEHOLDER} placeholder")
    if _COORDS.search(text):
        raise CompletionError(f"{what} quotes box coordinates")
    if _SOURCES.search(text):
        raise CompletionError(f"{what} mentions its sources ({_SOURCES.search(text).group(0)!r})")


# Caption words that name nothing in the image, left out of what a description must mention.
_FUNCTION_WORDS = frozenset(
    "a an the and or of on in at to with without from by for near next beside above below under over behind "
    "into onto this that these those there here is are was were be been it its their they them some several "
    "two three four five many few one other another very picture image photo scene shows showing".split())
MIN_DESCRIBED = 2  # terms of the annotation a detailed description names at least (fewer if it has fewer)


def annotated_terms(ann: ImageAnnotation) -> set[str]:
    """What a description of ``ann`` can name: its boxes' categories and attribute values, or
    without boxes its captions' content words."""
    terms = {b.category.lower().strip() for b in ann.boxes}
    terms |= {str(v).lower().strip() for b in ann.boxes for v in b.attributes.values() if isinstance(v, str)}
    if not terms:
        terms = {w for c in ann.captions for w in re.findall(r"[a-z]+", c.lower())
                 if len(w) > 2 and w not in _FUNCTION_WORDS}
    return {t for t in terms if t}


def check_describes(text: str, ann: ImageAnnotation) -> None:
    """Raise CompletionError where ``text`` names fewer than `MIN_DESCRIBED` of the annotated terms:
    a chatty reply ("Sure! Here are some thoughts about the picture.") describes nothing."""
    terms = annotated_terms(ann)
    if not terms:
        return
    low = text.lower()
    named = {t for t in terms if re.search(rf"\b{re.escape(t)}(e?s)?\b", low)}
    need = min(MIN_DESCRIBED, len(terms))
    if len(named) < need:
        raise CompletionError(f"not a description: names {len(named)} of the image's {len(terms)} annotated "
                              f"objects and attributes, at least {need} needed")


def parse_qa(text: str) -> list[tuple[str, str]]:
    """`Question:` / `Answer:` blocks -> pairs. Separators (`===`) are optional; text before
    the first marker (a chatty preamble) is dropped."""
    marks = list(_MARKER.finditer(text))
    if not marks:
        raise CompletionError("no 'Question:' / 'Answer:' markers")
    blocks = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        body = text[m.end(): nxt.start() if nxt else len(text)]
        body = _SEPARATOR.sub("", body).strip()
        blocks.append((m.group(1).lower(), body))
    pairs = []
    for i in range(0, len(blocks), 2):
        (k1, q), second = blocks[i], (blocks[i + 1] if i + 1 < len(blocks) else None)
        if k1 != "question":
            raise CompletionError(f"block {i + 1} is an answer where a question was expected")
        if second is None:
            raise CompletionError(f"question {i // 2 + 1} has no answer")
        if second[0] != "answer":
            raise CompletionError(f"question {i // 2 + 1} is followed by another question")
        _check_text(q, f"question {i // 2 + 1}")
        _check_text(second[1], f"answer {i // 2 + 1}")
        pairs.append((q, second[1]))
    return pairs


def parse_completion(kind: str, text: str | None, ann: ImageAnnotation | None = None
                     ) -> list[tuple[str, str | None]]:
    """Completion text -> (question, answer) pairs for `kind`.

    ``detail`` returns one pair with question None (the caller draws an instruction); with
    ``ann``, it must name what the image holds (`check_describes`).
    Raises `CompletionError` for refusals, malformed text and leaked sources.
    """
    text = (text or "").strip()
    if not text:
        raise CompletionError("empty completion")
    if _REFUSAL.search(text) or _AI_DISCLAIMER.search(text):
        raise CompletionError("refusal: " + text.splitlines()[0][:80])
    if kind == "detail":
        if _MARKER.search(text) or _SEPARATOR.search(text):
            raise CompletionError("detail description contains Question/Answer markers")
        _check_text(text, "description")
        if ann is not None:
            check_describes(text, ann)
        return [(None, text)]  # type: ignore[list-item]
    pairs = parse_qa(text)
    if kind == "reasoning" and len(pairs) != 1:
        raise CompletionError(f"expected one question and answer, got {len(pairs)}")
    return pairs
