import json

import pytest

from eval_helpers import ScriptedGenerator, saved_model, write_images, write_jsonl  # noqa: F401 (fixture)
from vistune.cli import main
from vistune.eval.pope import binary_metrics, evaluate, parse_yes_no, score
from vistune.eval.runner import EvalError, RunSettings


@pytest.mark.parametrize("reply, parsed", [
    ("Yes", "yes"), ("Yes, there is a dog in the image.", "yes"), ("No", "no"), ("no", "no"),
    ("No, there is no dog.", "no"), ("There is not a dog.", "no"),
    ("Yes. But no cat.", "yes"),        # only the first sentence counts
    ("Yes, no doubt", "no"),            # commas dropped, 'no' is a word of the first sentence
    ("No.", "no"), ("Nope", "yes"),     # LLaVA's rule is word-exact and case-sensitive
    ("", "yes"),
])
def test_parse_yes_no_is_llavas_rule(reply, parsed):
    assert parse_yes_no(reply) == parsed


def test_binary_metrics_by_hand():
    m = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # tp=2 fn=1 tn=1 fp=1
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 5)
    none_yes = binary_metrics(["yes", "no"], ["no", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5


def test_score_per_category():
    qs = [{"question_id": str(i), "label": lab, "category": cat}
          for i, (lab, cat) in enumerate([("yes", "random"), ("no", "random"), ("yes", "adversarial"), ("no", "adversarial")])]
    m, rows = score(qs, {"0": "Yes.", "1": "Yes, it is.", "2": "No.", "3": "No, there is not."})
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.5
    assert m["by"]["category"]["random"]["accuracy"] == 0.5 and m["by"]["category"]["random"]["yes_ratio"] == 1.0
    assert m["by"]["category"]["adversarial"]["recall"] == 0.0
    # F1: random has precision 1/2, recall 1 -> 2/3; adversarial 0.
    assert m["f1_mean_over_categories"] == pytest.approx((2 / 3 + 0) / 2)


def test_labels_are_checked(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 5, "image": "a.png", "text": "Is there a cat?",
                                               "label": "maybe"}])
    with pytest.raises(EvalError, match="question '5'.*'yes' or 'no'"):
        evaluate(ScriptedGenerator(lambda t, i: "yes"), data, tmp_path, tmp_path / "out", RunSettings(progress=False))


def _questions():
    rows = []
    for i, (obj, label, cat) in enumerate([("dog", "yes", "random"), ("cat", "no", "random"),
                                           ("car", "yes", "popular"), ("tree", "no", "popular")]):
        rows.append({"question_id": i, "image": f"{i % 2}.png", "text": f"Is there a {obj} in the image?",
                     "label": label, "category": cat})
    return rows


def test_evaluate_scripted(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", _questions())
    images = write_images(tmp_path / "img", ["0.png", "1.png"])
    gen = ScriptedGenerator(lambda text, imgs: "Yes, there is." if "dog" in text or "cat" in text else "No.")
    m = evaluate(gen, data, images, tmp_path / "out", RunSettings(batch_size=3, progress=False))
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["by"]["category"]["random"]["accuracy"] == 0.5 and m["by"]["category"]["popular"]["yes_ratio"] == 0.0
    assert [len(b) for b in gen.batches] == [3, 1]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Confusion" in report and "| answered yes | 1 | 1 |" in report


def test_eval_pope_cli_through_real_engine(tmp_path, saved_model, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", _questions())
    images = write_images(tmp_path / "img", ["0.png", "1.png"])
    out = tmp_path / "out"
    rc = main(["eval", "pope", "--model", str(saved_model), "--data", str(data), "--images", str(images),
               "--out", str(out), "--max-new-tokens", "3", "--limit", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert m["count"] == 3 and len(preds) == 3
    assert all(p["answer"] == parse_yes_no(p["text"]) for p in preds)
    assert m["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 3)
    assert (out / "pope.png").is_file()
