from vistune.demo.evaluate import grade, majority_baseline, normalize

QUESTIONS = [
    {"question_id": "a", "kind": "color", "text": "What color is the circle?", "answer": "red"},
    {"question_id": "b", "kind": "color", "text": "What color is the square?", "answer": "blue"},
    {"question_id": "c", "kind": "count", "text": "How many objects are there?", "answer": "two"},
    {"question_id": "d", "kind": "count", "text": "How many objects are there?", "answer": "two"},
]


def test_normalize_drops_case_and_punctuation():
    assert normalize("  Red. ") == "red"
    assert normalize("Left, no!") == "left no"


def test_grade_exact_match_by_kind():
    g = grade(QUESTIONS, ["Red", "green", "Two.", "three"])
    assert g.n == 4
    assert g.accuracy == 0.5
    assert g.by_kind == {"color": 0.5, "count": 0.5}
    assert [s["correct"] for s in g.samples] == [True, False, True, False]


def test_first_word_counts_answers_that_do_not_stop():
    # "Blue No No No" has the right answer first but never stopped: wrong by exact match.
    g = grade(QUESTIONS, ["Red", "Blue No No No", "two objects", "No two"])
    assert g.accuracy == 0.25
    assert g.first_word == 0.75


def test_majority_baseline_per_kind_and_overall():
    m = majority_baseline(QUESTIONS)
    assert m["color"] == 0.5 and m["count"] == 1.0
    assert m["overall"] == 0.75
