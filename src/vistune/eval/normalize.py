"""VQAv2 answer normalisation, as the official VQA evaluation documents it.

Steps, in the official order:

1. newlines and tabs become spaces; surrounding whitespace goes;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if it
   touches a space somewhere in the answer, or if the answer has a comma between
   digits ("1,000" -> "1000"); otherwise it becomes a space ("t-shirt" -> "t shirt").
   Apostrophes and colons stay ("2:30", "man's");
3. periods go unless a digit follows ("3.5" stays, "dog." -> "dog");
4. lower case, word by word: number words zero-ten become digits (and "none" -> "0",
   as the official map does), articles a/an/the are dropped, and a contraction
   missing its apostrophe gets it back ("dont" -> "don't").

Written from that documented behaviour, not copied.
"""
from __future__ import annotations

import re

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")

# Contractions written with their apostrophes; the map below is every way of dropping
# them. Forms that are also ordinary words ("its", "well", "were", "ill", "shell", "id",
# "wed", "hell") are left out: an answer "well" must stay "well".
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've it'll let's
ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd
she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we're we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've
""".split()
_ORDINARY_WORDS = {"its", "well", "were", "ill", "shell", "id", "wed", "hell"}


def _contraction_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for full in _CONTRACTIONS:
        parts = full.split("'")
        # Every subset of the apostrophes dropped: "couldntve", "couldnt've", "couldn'tve".
        for mask in range(1 << (len(parts) - 1)):
            form = parts[0]
            for i, part in enumerate(parts[1:]):
                form += ("'" if mask >> i & 1 else "") + part
            if form != full and form not in _ORDINARY_WORDS:
                out[form] = full
    return out


CONTRACTIONS = _contraction_map()


def process_punctuation(text: str) -> str:
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def process_digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """An answer in the form the VQAv2 scorer compares."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2 accuracy. With ten human answers: min(#matching / 3, 1) against each 9 of the
    10, averaged over the 10 leave-one-out subsets; with one reference: exact match.
    Both sides are normalised first."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    if len(refs) != 10:
        raise ValueError(f"expected 1 or 10 reference answers, got {len(refs)}")
    matches = sum(r == pred for r in refs)
    # Leaving out a matching answer leaves matches-1 in the subset, otherwise matches.
    return (matches * min(1.0, (matches - 1) / 3) + (10 - matches) * min(1.0, matches / 3)) / 10
