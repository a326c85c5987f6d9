import pytest

from vistune.eval.normalize import CONTRACTIONS, normalize_answer, process_punctuation, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    # case and whitespace
    ("Yes", "yes"), ("  Red\n", "red"), ("two\tdogs", "2 dogs"),
    # number words -> digits, including the official map's "none" -> "0"
    ("Two", "2"), ("ten", "10"), ("zero", "0"), ("none", "0"), ("eleven", "eleven"),
    # articles dropped, only as whole words
    ("the red one", "red 1"), ("a cat!", "cat"), ("an apple", "apple"), ("theater", "theater"),
    # periods: kept as decimals, dropped otherwise
    ("3.5", "3.5"), ("no.", "no"), ("u.s.", "us"), (".5 inches", ".5 inches"),
    # commas between digits: all punctuation is deleted
    ("1,000", "1000"), ("10,000,000", "10000000"),
    # punctuation touching a space is deleted, otherwise it becomes a space
    ("hot dog, pizza", "hot dog pizza"), ("t-shirt", "t shirt"), ("black-and-white", "black and white"),
    ("(left)", "left"), ("yes!", "yes"), ("what?", "what"), ("red/white", "red white"), ("left - right", "left right"),
    # apostrophes and colons stay
    ("2:30", "2:30"), ("man's", "man's"),
    # missing apostrophes restored, ordinary words untouched
    ("dont know", "don't know"), ("isnt", "isn't"), ("couldntve", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("im", "i'm"), ("its", "its"), ("well", "well"), ("were", "were"),
])
def test_normalize_known_cases(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_step_alone_keeps_case_and_words():
    assert process_punctuation("Hello-World") == "Hello World"
    assert process_punctuation("A, B") == "A B"


def test_contraction_map_has_no_identity_entries():
    assert all(k != v and "'" in v for k, v in CONTRACTIONS.items())


def test_exact_match_with_one_reference():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("The dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


@pytest.mark.parametrize("matches, expected", [
    # Hand computed: with m of 10 humans agreeing, the m leave-one-out subsets that drop a
    # match see m-1 matches, the other 10-m see m; each scores min(k/3, 1).
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),        # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),        # 0.9
    (4, 1.0), (10, 1.0),
])
def test_vqav2_soft_accuracy(matches, expected):
    refs = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("Yes", refs) == pytest.approx(expected)


def test_soft_accuracy_normalises_references_too():
    refs = ["Two", "2", "two.", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", refs) == pytest.approx(0.9)


def test_other_reference_counts_are_refused():
    with pytest.raises(ValueError, match="1 or 10"):
        vqa_accuracy("a", ["a", "b"])
