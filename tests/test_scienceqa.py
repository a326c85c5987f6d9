import json

import pytest
from PIL import Image

from eval_helpers import ScriptedGenerator, problem, saved_model, write_scienceqa  # noqa: F401 (fixture)
from vistune.cli import main
from vistune.data.records import RecordFile
from vistune.eval.runner import EvalError, RunSettings
from vistune.eval.scienceqa import (
    categories, evaluate, extract_answer, instruction, load_problems, load_split, score, target,
)

CHOICES = ["cat", "dog", "bird"]


# ------------------------------------------------------------------ format

def test_instruction_is_qcm_with_image_placeholder_last():
    p = problem("Which animal barks?", ["cat", "dog"], 1, hint="Look at the picture.", image="image.png")
    assert instruction(p) == "Which animal barks?\nContext: Look at the picture.\nOptions: (A) cat (B) dog\n<image>"
    p = problem("Which animal barks?", ["cat", "dog"], 1)
    assert instruction(p) == "Which animal barks?\nContext: N/A\nOptions: (A) cat (B) dog"
    assert instruction(p, letter_prompt=True).endswith(
        "(B) dog\nAnswer with the option's letter from the given choices directly.")


def test_target_is_lecture_solution_answer():
    assert target(problem("q", CHOICES, 2, lecture="Birds fly.", solution="It flies.")) == \
        "Birds fly. It flies. The answer is C."
    # An empty lecture leaves no doubled or leading space.
    assert target(problem("q", CHOICES, 0, lecture="", solution="Cats meow.")) == "Cats meow. The answer is A."


# -------------------------------------------------------------- extraction

@pytest.mark.parametrize("reply, letter, rule", [
    # LLaVA's three rules, in order
    ("A", "A", "letter"),
    ("B. dog", "B", "leading letter"),
    ("The answer is C.", "C", "the answer is"),
    ("Dogs bark.\nSo it is the dog. The answer is B.", "B", "the answer is"),
    ("E", "E", "letter"),                       # LLaVA accepts A-E: parsed, but not a valid choice -> wrong
    ("D. a fish", "D", "leading letter"),
    ("The answer is A dog.", "A", "the answer is"),  # LLaVA's regex quirk, kept on purpose
    # fallbacks
    ("The answer is B", "B", "fallback: answer is"),       # no character after the letter
    ("The answer is B.\nThe answer is B.", "B", "fallback: answer is"),  # two agreeing matches
    ("The answer is A. No wait, the answer is B.", "A", "the answer is"),  # LLaVA's regex is case-sensitive
    ("(B)", "B", "fallback: letter"),
    ("B)", "B", "fallback: letter"),
    ("B.", "B", "fallback: letter"),
    (" C \n", "C", "fallback: letter"),
    ("(C) bird", "C", "fallback: letter"),
    ("C: bird", "C", "fallback: letter"),
    ("Answer: B", "B", "fallback: answer is"),
    ("The correct answer is (A).", "A", "fallback: answer is"),
    ("The answer is: C", "C", "fallback: answer is"),
    ("Answer: (A) cat", "A", "fallback: answer is"),
    ("dog", "B", "fallback: choice text"),
    ("Bird.", "C", "fallback: choice text"),
    ("The answer is dog.", "B", "fallback: choice text"),
    # unparseable
    ("The answer is A. No wait, The answer is B.", None, "failed"),
    ("I think it is a cat or a dog", None, "failed"),
    ("the answer is b", None, "failed"),
    ("", None, "failed"),
    ("(F)", None, "failed"),                    # fallbacks accept only real options
])
def test_extract_answer_styles(reply, letter, rule):
    got = extract_answer(reply, CHOICES)
    assert (got.letter, got.rule) == (letter, rule)


# -------------------------------------------------------------- categories

def test_categories_follow_the_official_rules():
    assert categories(problem("q", CHOICES, 0, hint="h", image="image.png", grade="grade6")) == \
        {"subject": ["NAT"], "context": ["TXT", "IMG"], "grade": ["G1-6"]}
    assert categories(problem("q", CHOICES, 0, subject="language science", grade="grade7")) == \
        {"subject": ["LAN"], "context": ["NO"], "grade": ["G7-12"]}
    assert categories(problem("q", CHOICES, 0, subject="social science", image="image.png", grade="grade12")) == \
        {"subject": ["SOC"], "context": ["IMG"], "grade": ["G7-12"]}


def _four_problems():
    return {
        "1": problem("q1", CHOICES, 0, hint="h", grade="grade2"),
        "2": problem("q2", CHOICES, 1, subject="social science", image="image.png", grade="grade8"),
        "3": problem("q3", CHOICES, 2, subject="language science", grade="grade12"),
        "4": problem("q4", CHOICES, 0, hint="h", image="image.png", grade="grade5"),
    }


def test_score_by_hand():
    metrics, rows = score(_four_problems(), {"1": "The answer is A.", "2": "A", "3": "(C)", "4": "no idea"})
    assert metrics["accuracy"] == 0.5 and metrics["correct"] == 2 and metrics["count"] == 4
    assert metrics["failed"] == ["4"]
    acc = {name: v["accuracy"] for g in metrics["by"].values() for name, v in g.items()}
    assert acc == {"NAT": 0.5, "SOC": 0.0, "LAN": 1.0, "TXT": 0.5, "IMG": 0.0, "NO": 1.0, "G1-6": 0.5, "G7-12": 0.5}
    assert metrics["by"]["context"]["IMG"]["count"] == 2
    assert [r["correct"] for r in rows] == [True, False, True, False]


# ------------------------------------------------------------------- files

def test_load_problems_names_the_bad_problem(tmp_path):
    bad = {"7": {**problem("q", CHOICES, 0)}}
    del bad["7"]["choices"]
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(EvalError, match=r"problem '7': missing field 'choices'"):
        load_problems(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"8": problem("q", CHOICES, 3)}))
    with pytest.raises(EvalError, match=r"problem '8': 'answer' 3"):
        load_problems(tmp_path / "p.json")


def test_load_split_checks_names(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"test": ["1", "99"]}))
    with pytest.raises(EvalError, match="no split 'val'"):
        load_split(tmp_path / "s.json", "val", {"1": {}})
    with pytest.raises(EvalError, match="'99'"):
        load_split(tmp_path / "s.json", "test", {"1": {}})


def test_data_scienceqa_converter(tmp_path, capsys):
    probs = _four_problems()
    pj, sj, images = write_scienceqa(tmp_path, probs, {"train": ["1", "2", "3", "4"]})
    out = tmp_path / "sqa_train.jsonl"
    rc = main(["data", "scienceqa", "--problems", str(pj), "--splits", str(sj), "--images", str(images),
               "--split", "train", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    recs = list(RecordFile(out))
    assert [r.id for r in recs] == ["1", "2", "3", "4"]
    assert recs[0].images == [] and recs[1].images == ["train/2/image.png"]
    assert (images / recs[1].images[0]).is_file()
    assert recs[1].conversations[0]["value"].endswith("Options: (A) cat (B) dog (C) bird\n<image>")
    assert recs[1].conversations[1]["value"] == "A lecture. A solution. The answer is B."

    (images / "train" / "4" / "image.png").unlink()
    rc = main(["data", "scienceqa", "--problems", str(pj), "--splits", str(sj), "--images", str(images),
               "--split", "train", "--out", str(tmp_path / "again.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and "problem '4'" in err and "train/4/image.png" in err
    assert not (tmp_path / "again.jsonl").exists()


# ------------------------------------------------------------- end to end

def test_evaluate_with_scripted_model_resumes_and_reports(tmp_path):
    pj, sj, images = write_scienceqa(tmp_path / "sqa", _four_problems(), {"test": ["1", "2", "3", "4"]})
    replies = {"q1": "The answer is A.", "q2": "The answer is C.", "q3": "C", "q4": "hmm"}
    gen = ScriptedGenerator(lambda text, imgs: replies[text.split("\n")[0]])
    out = tmp_path / "out"
    m = evaluate(gen, pj, sj, images, out, RunSettings(batch_size=2, limit=2, progress=False))
    assert m["count"] == 2 and m["accuracy"] == 0.5 and gen.calls == 2
    # The illustrated problem got its image and the placeholder.
    assert gen.batches[0][1].endswith("<image>")

    m = evaluate(gen, pj, sj, images, out, RunSettings(batch_size=2, progress=False))
    assert gen.calls == 4  # only the two new problems were asked
    assert m["accuracy"] == 0.5 and m["failed"] == ["4"]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == 0.5
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["question_id"] for p in preds] == ["1", "2", "3", "4"]
    assert preds[1]["pred"] == "C" and preds[1]["correct"] is False and preds[3]["rule"] == "failed"
    report = (out / "report.md").read_text()
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in report and "| 4 | hmm |" in report
    with Image.open(out / "scienceqa.png") as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_eval_scienceqa_cli_through_real_engine(tmp_path, saved_model, capsys):
    pj, sj, images = write_scienceqa(tmp_path / "sqa", _four_problems(), {"test": ["1", "2", "3", "4"]})
    out = tmp_path / "out"
    args = ["eval", "scienceqa", "--model", str(saved_model), "--problems", str(pj), "--splits", str(sj),
            "--images", str(images), "--out", str(out), "--limit", "3", "--batch-size", "2",
            "--max-new-tokens", "4", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert m["count"] == 3 and len(preds) == 3
    assert all(p["completion_tokens"] <= 4 and isinstance(p["text"], str) for p in preds)
    assert m["accuracy"] == sum(p["correct"] for p in preds) / 3
    # Greedy and resumable: a rerun reuses every prediction and scores the same.
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    assert "resume with the same settings" in _run_err(main, args[:-2] + ["8", "--no-progress"], capsys)


def _run_err(fn, args, capsys) -> str:
    capsys.readouterr()
    assert fn(args) == 1
    return capsys.readouterr().err
