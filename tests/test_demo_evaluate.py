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


def test_object_recall_counts_an_object_named_in_either_order(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from vistune.demo.evaluate import object_recall
    from vistune.instruct.annotations import Box, ImageAnnotation

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    boxes = [Box(s, (1.0, 1.0, 9.0, 9.0), {"color": c, "shape": s, "size": "small"})
             for c, s in (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("purple", "diamond"))]
    ann = ImageAnnotation(id="a", file="a.png", width=64, height=64, captions=["x"], boxes=boxes)

    class Fake:
        def generate(self, prompts, cfg):
            # Three of four named, in three different forms; "green" and "triangle" apart do not count.
            return [SimpleNamespace(text="A small circle in red, a Square colored blue, a purple diamond. "
                                         "Green things and a triangle.") for _ in prompts]

    recall, samples = object_recall(Fake(), [ann], tmp_path)
    assert recall == 0.75 and samples[0]["recalled"] == 3
