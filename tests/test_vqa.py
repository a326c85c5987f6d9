import json

import pytest

from eval_helpers import ScriptedGenerator, saved_model, write_images, write_jsonl  # noqa: F401 (fixture)
from vistune.cli import main
from vistune.eval.runner import EvalError, RunSettings
from vistune.eval.vqa import SHORT_ANSWER_SUFFIX, evaluate, references, score

TEN = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]


def _questions():
    return [
        {"question_id": 1, "image": "a.png", "text": "How many dogs?", "answers": [{"answer": a} for a in TEN],
         "question_type": "how many", "answer_type": "number"},
        {"question_id": 2, "image": "b.png", "text": f"Is this a cat?\n{SHORT_ANSWER_SUFFIX}", "answers": ["yes"],
         "question_type": "is this", "answer_type": "yes/no"},
        {"question_id": 3, "image": "a.png", "text": "What color is the car?", "answers": ["red"],
         "question_type": "what color", "answer_type": "other"},
    ]


def test_references_accept_strings_and_vqav2_objects():
    assert references({"question_id": "1", "answers": ["a"]}) == ["a"]
    assert references({"question_id": "1", "answers": [{"answer": "b", "answer_id": 1}] * 10}) == ["b"] * 10
    with pytest.raises(EvalError, match="question '7'.*1 or 10"):
        references({"question_id": "7", "answers": ["a", "b"]})
    with pytest.raises(EvalError, match="question '8'.*non-empty list"):
        references({"question_id": "8", "answers": []})


def test_score_by_hand():
    qs = _questions()
    for q in qs:
        q["question_id"] = str(q["question_id"])
    metrics, rows = score(qs, {"1": "Two", "2": "Yes.", "3": "blue"})
    # q1: 3 of 10 humans said 2 -> 0.9; q2: exact -> 1; q3: wrong -> 0.
    assert [r["accuracy"] for r in rows] == pytest.approx([0.9, 1.0, 0.0])
    assert metrics["accuracy"] == pytest.approx(1.9 / 3)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["soft_accuracy_questions"] == 1
    assert {k: v["accuracy"] for k, v in metrics["by"]["question_type"].items()} == \
        pytest.approx({"how many": 0.9, "is this": 1.0, "what color": 0.0})
    assert metrics["by"]["answer_type"]["number"]["count"] == 1
    assert rows[0]["answer"] == "2"


def test_evaluate_scripted(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", _questions())
    images = write_images(tmp_path / "img", ["a.png", "b.png"])
    gen = ScriptedGenerator(lambda text, imgs: {"How": "2", "Is ": "yes", "Wha": "red"}[text[:3]])
    m = evaluate(gen, data, images, tmp_path / "out", RunSettings(batch_size=2, progress=False))
    assert m["accuracy"] == pytest.approx((0.9 + 1 + 1) / 3)
    sent = [t for b in gen.batches for t in b]
    # The suffix is added once, also to the line that already carried it; images go to the engine.
    assert sent[0] == f"How many dogs?\n{SHORT_ANSWER_SUFFIX}"
    assert sent[1].count(SHORT_ANSWER_SUFFIX) == 1
    assert gen.configs[0].temperature == 0.0
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["by"]["answer_type"]["yes/no"]["accuracy"] == 1.0
    assert "## By question_type" in (out / "report.md").read_text() and (out / "vqa.png").stat().st_size > 1000


def test_bad_line_is_named_before_generation(tmp_path):
    qs = _questions()
    qs[2]["answers"] = ["a", "b", "c"]
    data = write_jsonl(tmp_path / "q.jsonl", qs)
    gen = ScriptedGenerator(lambda t, i: "x")
    with pytest.raises(EvalError, match="question '3'"):
        evaluate(gen, data, tmp_path, tmp_path / "out", RunSettings(progress=False))
    assert gen.calls == 0


def test_eval_vqa_cli_through_real_engine(tmp_path, saved_model, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", _questions())
    images = write_images(tmp_path / "img", ["a.png", "b.png"])
    out = tmp_path / "out"
    rc = main(["eval", "vqa", "--model", str(saved_model), "--data", str(data), "--images", str(images),
               "--out", str(out), "--max-new-tokens", "3", "--batch-size", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert m["count"] == 3 and 0.0 <= m["accuracy"] <= 1.0
    assert m["accuracy"] == pytest.approx(sum(p["accuracy"] for p in preds) / 3)
    assert all(p["prompt"].endswith(SHORT_ANSWER_SUFFIX) and p["completion_tokens"] <= 3 for p in preds)


def test_prefix_match_counts_answers_that_start_right_but_do_not_stop():
    qs = [{"question_id": str(i), "answers": [a]} for i, a in enumerate(["blue", "two", "red circle", "yes"])]
    metrics, rows = score(qs, {"0": "Blue No No No", "1": "2 objects", "2": "red", "3": "no yes"})
    assert [r["prefix_match"] for r in rows] == [True, True, False, False]
    assert metrics["prefix_match"] == 0.5 and metrics["exact_match"] == 0.0
    # An exact match is a prefix match too.
    assert score(qs[:1], {"0": "Blue."})[0]["prefix_match"] == 1.0


def test_majority_baseline_per_question_type_and_overall():
    from vistune.eval.vqa import majority_baseline

    qs = [{"question_id": "a", "answers": ["red"], "question_type": "color"},
          {"question_id": "b", "answers": ["Blue"], "question_type": "color"},
          {"question_id": "c", "answers": ["two"], "question_type": "count"},
          {"question_id": "d", "answers": ["2"], "question_type": "count"}]  # "two" and "2" are one answer
    m = majority_baseline(qs)
    assert m == {"color": 0.5, "count": 1.0, "overall": 0.75}
