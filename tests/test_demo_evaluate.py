import json

import pytest
from PIL import Image

from eval_helpers import ScriptedGenerator
from vistune.demo.evaluate import answer_questions, object_recall, vqa_questions, write_blank_questions
from vistune.files import write_jsonl
from vistune.instruct.annotations import Box, ImageAnnotation

QUESTIONS = [
    {"question_id": "a", "image": "images/a.png", "kind": "color",
     "text": "What color is the circle?\nAnswer the question using a single word or phrase.", "answer": "red"},
    {"question_id": "b", "image": "images/a.png", "kind": "color", "text": "What color is the square?",
     "answer": "blue"},
    {"question_id": "c", "image": "images/a.png", "kind": "count", "text": "How many objects are there?",
     "answer": "two"},
    {"question_id": "d", "image": "images/a.png", "kind": "count", "text": "How many shapes are there?",
     "answer": "two"},
]


@pytest.fixture
def held_out(tmp_path):
    (tmp_path / "world" / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 20, 20)).save(tmp_path / "world" / "images" / "a.png")
    return tmp_path / "world"


def test_the_rules_questions_become_vqa_lines_with_one_reference_and_their_kind():
    q = vqa_questions(QUESTIONS)[0]
    assert q == {"question_id": "a", "image": "images/a.png", "text": QUESTIONS[0]["text"], "answers": ["red"],
                 "question_type": "color"}


def test_eval_grades_exact_match_by_kind_and_first_words(tmp_path, held_out):
    qfile = write_jsonl(tmp_path / "q.jsonl", vqa_questions(QUESTIONS))
    # "Blue No No No" has the right answer first but never stopped: wrong by exact match.
    answers = {"What color is the c": "Red", "What color is the s": "Blue No No No", "How many o": "Two.",
               "How many s": "three"}
    gen = ScriptedGenerator(lambda text, imgs: next(v for k, v in answers.items() if text.startswith(k)))
    metrics, samples = answer_questions(gen, qfile, held_out, tmp_path / "eval" / "full", "full", batch_size=3)
    assert metrics["exact_match"] == 0.5 and metrics["prefix_match"] == 0.75
    assert {k: v["accuracy"] for k, v in metrics["by"]["question_type"].items()} == {"color": 0.5, "count": 0.5}
    assert [s["correct"] for s in samples] == [True, False, True, False]
    assert samples[1] == {"question_id": "b", "kind": "color", "question": "What color is the square?",
                          "answer": "Blue No No No", "expected": "blue", "correct": False}
    # The format prompt the rules backend wrote is not added twice; eval's files are there.
    assert gen.batches[0][0] == QUESTIONS[0]["text"]
    assert json.loads((tmp_path / "eval" / "full" / "metrics.json").read_text())["model"] == "full"


def test_text_only_asks_every_question_about_one_blank_image(tmp_path, held_out):
    qfile = write_blank_questions(vqa_questions(QUESTIONS), tmp_path / "eval", 24)
    seen = []
    gen = ScriptedGenerator(lambda text, imgs: seen.extend(imgs) or "red")
    metrics, _ = answer_questions(gen, qfile, tmp_path / "eval", tmp_path / "eval" / "text_only", "text_only")
    assert metrics["count"] == 4 and len(seen) == 4
    assert all(im.size == (24, 24) and im.getcolors() == [(24 * 24, (122, 116, 104))] for im in seen)


def test_object_recall_counts_an_object_named_in_either_order(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    boxes = [Box(s, (1.0, 1.0, 9.0, 9.0), {"color": c, "shape": s, "size": "small"})
             for c, s in (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("purple", "diamond"))]
    ann = ImageAnnotation(id="a", file="a.png", width=64, height=64, captions=["x"], boxes=boxes)
    # Three of four named, in three different forms; "green" and "triangle" apart do not count.
    gen = ScriptedGenerator(lambda text, imgs: "A small circle in red, a Square colored blue, a purple diamond. "
                                               "Green things and a triangle.")
    recall, samples = object_recall(gen, [ann], tmp_path, tmp_path / "descriptions")
    assert recall == 0.75 and samples[0]["recalled"] == 3
    assert gen.batches == [["Describe this image in detail."]]
    assert (tmp_path / "descriptions" / "predictions.jsonl").exists()  # made by eval's runner
