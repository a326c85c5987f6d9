"""Batch prediction over a question file: answers, resume, clear errors, skipping bad questions, the CLI."""
from __future__ import annotations

import io
import json

import pytest
from conftest import make_model, noise_image, solid_image

from vistune.cli import main
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.infer.predict import PredictError, errors_path, predict_file, read_questions
from vistune.model.checkpoint import LoadedModel, save_model

CFG = GenerationConfig(max_new_tokens=6)


@pytest.fixture
def setup(tokenizer, tmp_path):
    model, tok = make_model(tokenizer)
    engine = Engine(LoadedModel(model, tok))
    imgs = tmp_path / "images"
    imgs.mkdir()
    noise_image(1).save(imgs / "a.png")
    solid_image((0, 255, 0)).save(imgs / "b.png")
    questions = [
        {"question_id": 1, "image": "a.png", "text": "what is it?"},
        {"question_id": "q2", "text": "a question without an image"},
        {"question_id": 3, "image": ["a.png", "b.png"], "text": "compare them"},
        {"question_id": 4, "image": "b.png", "text": "<image>\nwhat color? Answer with one word."},
        {"question_id": 5, "image": "b.png", "text": "is it green?"},
    ]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return engine, model, tok, imgs, qfile, questions


def expected(engine, imgs, q, config=CFG):
    from PIL import Image

    files = [q["image"]] if isinstance(q.get("image"), str) else q.get("image", [])
    images = [Image.open(imgs / f).convert("RGB") for f in files]
    return engine.generate([Prompt.ask(q["text"], images)], config)[0].text


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_equal_one_by_one_generation(setup, tmp_path):
    engine, model, tok, imgs, qfile, questions = setup
    out = tmp_path / "answers.jsonl"
    stats = predict_file(engine, qfile, out, imgs, batch_size=2, config=CFG, model_name="tiny", progress=False)
    assert (stats.total, stats.skipped, stats.written) == (5, 0, 5)
    answers = read(out)
    assert [a["question_id"] for a in answers] == [1, "q2", 3, 4, 5]
    assert all(a["model"] == "tiny" and a["prompt"] == q["text"] for a, q in zip(answers, questions))
    assert [a["text"] for a in answers] == [expected(engine, imgs, q) for q in questions]


def test_resume_skips_answered_and_drops_a_torn_line(setup, tmp_path):
    engine, model, tok, imgs, qfile, questions = setup
    full = tmp_path / "full.jsonl"
    predict_file(engine, qfile, full, imgs, batch_size=5, config=CFG, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    out = tmp_path / "answers.jsonl"
    out.write_text(lines[0] + lines[2] + lines[1][:25])  # ids 1 and 3 done, q2 torn mid-write
    stats = predict_file(engine, qfile, out, imgs, batch_size=2, config=CFG, progress=False)
    assert (stats.skipped, stats.written) == (2, 3)
    answers = read(out)
    assert sorted(map(str, (a["question_id"] for a in answers))) == ["1", "3", "4", "5", "q2"]
    assert {json.dumps(a["question_id"]): a["text"] for a in answers} == \
        {json.dumps(a["question_id"]): a["text"] for a in read(full)}
    again = predict_file(engine, qfile, out, imgs, batch_size=2, config=CFG, progress=False)
    assert again.written == 0 and len(read(out)) == 5


def test_bad_input_names_the_culprit(setup, tmp_path):
    engine, model, tok, imgs, qfile, questions = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 7, "image": "nope.png", "text": "hi"}) + "\n")
    with pytest.raises(PredictError, match=r"question 7 .*nope\.png"):
        predict_file(engine, bad, tmp_path / "o.jsonl", imgs, config=CFG, progress=False)
    bad.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(PredictError, match=r"bad\.jsonl:2: question_id 1 repeats line 1"):
        read_questions(bad)
    bad.write_text('{"question_id": 1, "text": "a"}\n{not json\n')
    with pytest.raises(PredictError, match=r"bad\.jsonl:2: not valid JSON"):
        read_questions(bad)
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(PredictError, match="has no 'text'"):
        read_questions(bad)
    out = tmp_path / "corrupt.jsonl"
    out.write_text("garbage\n")
    with pytest.raises(PredictError, match=r"corrupt\.jsonl:1: not an answer line"):
        predict_file(engine, qfile, out, imgs, config=CFG, progress=False)


def mixed_file(tmp_path, imgs, questions):
    """The setup's five questions with a missing image, a corrupt image, a malformed line and a prompt
    over the context among them; returns the file and what its errors file must list, by line:
    (question_id, line, words of the reason)."""
    png = io.BytesIO()
    noise_image(2).save(png, "PNG")
    (imgs / "broken.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    lines = [
        json.dumps(questions[0]),
        json.dumps({"question_id": "gone", "image": "gone.png", "text": "what is it?"}),
        json.dumps(questions[1]),
        '{"question_id": 9, "text": ',
        json.dumps({"question_id": 10, "image": "broken.png", "text": "what color?"}),
        json.dumps(questions[2]),
        json.dumps({"question_id": 11, "text": "describe the picture " * 400}),
        json.dumps(questions[3]),
        json.dumps(questions[4]),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    bad = [("gone", 2, ["image not found", "gone.png"]), (None, 4, ["not valid JSON"]),
           (10, 5, ["cannot decode image", "broken.png"]), (11, 7, ["context is 1024"])]
    return path, bad


def listed(out):
    """The errors file's rows as (question_id, line, reason), by line."""
    rows = read(errors_path(out))
    assert all(set(r) == {"question_id", "line", "reason"} for r in rows), rows
    return sorted(((r["question_id"], r["line"], r["reason"]) for r in rows), key=lambda r: r[1])


def check_listed(out, bad):
    rows = listed(out)
    assert [(qid, line) for qid, line, _ in rows] == [(qid, line) for qid, line, _ in bad]
    for (_, _, reason), (_, _, words) in zip(rows, bad):
        assert all(w in reason for w in words), (reason, words)


def test_skip_bad_answers_the_good_and_lists_the_bad(setup, tmp_path):
    engine, model, tok, imgs, qfile, questions = setup
    mixed, bad = mixed_file(tmp_path, imgs, questions)
    out = tmp_path / "answers.jsonl"
    # batches of three: each of the first two holds good questions and bad ones
    stats = predict_file(engine, mixed, out, imgs, batch_size=3, config=CFG, progress=False, skip_bad=True)
    assert (stats.total, stats.skipped, stats.written, stats.bad) == (9, 0, 5, 4)
    assert stats.errors == tmp_path / "answers.jsonl.errors.jsonl"
    answers = read(out)
    assert [a["question_id"] for a in answers] == [1, "q2", 3, 4, 5]
    assert [a["text"] for a in answers] == [expected(engine, imgs, q) for q in questions]
    check_listed(out, bad)


def test_without_skip_bad_the_first_bad_question_stops_the_run(setup, tmp_path):
    engine, model, tok, imgs, qfile, questions = setup
    mixed, bad = mixed_file(tmp_path, imgs, questions)
    out = tmp_path / "answers.jsonl"
    with pytest.raises(PredictError, match=r"mixed\.jsonl:4: not valid JSON"):
        predict_file(engine, mixed, out, imgs, batch_size=1, config=CFG, progress=False)
    lines = mixed.read_text().splitlines()
    mixed.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # without the malformed line
    with pytest.raises(PredictError, match=r"question 'gone' \(line 2\): image not found: .*gone\.png"):
        predict_file(engine, mixed, out, imgs, batch_size=1, config=CFG, progress=False)
    assert [a["question_id"] for a in read(out)] == [1]  # the answers before it are kept
    assert not errors_path(out).exists()


def test_skip_bad_rerun_retries_the_listed_questions(setup, tmp_path):
    engine, model, tok, imgs, qfile, questions = setup
    mixed, bad = mixed_file(tmp_path, imgs, questions)
    out = tmp_path / "answers.jsonl"

    def run():
        return predict_file(engine, mixed, out, imgs, batch_size=3, config=CFG, progress=False, skip_bad=True)

    run()
    again = run()  # nothing fixed: the same four, listed once each
    assert (again.skipped, again.written, again.bad) == (5, 0, 4)
    check_listed(out, bad)
    solid_image((0, 0, 255)).save(imgs / "gone.png")
    noise_image(2).save(imgs / "broken.png")
    fixed = run()
    assert (fixed.skipped, fixed.written, fixed.bad) == (5, 2, 2)
    check_listed(out, bad[1::2])
    answers = {a["question_id"]: a["text"] for a in read(out)}
    assert len(read(out)) == 7 and set(answers) == {1, "q2", 3, 4, 5, "gone", 10}
    assert answers["gone"] == expected(engine, imgs, {"image": "gone.png", "text": "what is it?"})
    assert answers[10] == expected(engine, imgs, {"image": "broken.png", "text": "what color?"})
    lines = mixed.read_text().splitlines()
    lines[3] = json.dumps({"question_id": 9, "text": "is it red?"})
    lines[6] = json.dumps({"question_id": 11, "text": "describe the picture"})
    mixed.write_text("\n".join(lines) + "\n")
    done = run()
    assert (done.written, done.bad, done.errors) == (2, 0, None)
    assert not errors_path(out).exists()  # nothing left to fix
    assert sorted(map(str, (a["question_id"] for a in read(out)))) == ["1", "10", "11", "3", "4", "5", "9",
                                                                       "gone", "q2"]


def test_skip_bad_list_survives_an_interruption(setup, tmp_path, monkeypatch):
    engine, model, tok, imgs, qfile, questions = setup
    mixed, bad = mixed_file(tmp_path, imgs, questions)
    out = tmp_path / "answers.jsonl"
    generate = engine.generate
    calls = []

    def interrupted_at_the_second_batch(prompts, config):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(prompts, config)

    monkeypatch.setattr(engine, "generate", interrupted_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_file(engine, mixed, out, imgs, batch_size=3, config=CFG, progress=False, skip_bad=True)
    assert [a["question_id"] for a in read(out)] == [1, "q2"]
    check_listed(out, bad)  # the second batch's bad questions are listed before it is generated
    monkeypatch.setattr(engine, "generate", generate)
    stats = predict_file(engine, mixed, out, imgs, batch_size=3, config=CFG, progress=False, skip_bad=True)
    assert (stats.skipped, stats.written, stats.bad) == (2, 3, 4)
    check_listed(out, bad)


def test_cli_predict(setup, tmp_path, capsys):
    engine, model, tok, imgs, qfile, questions = setup
    path = save_model(model, tok, tmp_path / "m")
    out = tmp_path / "a.jsonl"
    argv = ["predict", "--model", str(path), "--data", str(qfile), "--images", str(imgs), "--out", str(out),
            "--batch-size", "3", "--max-new-tokens", "6"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "5 questions: 5 answered now, 0 already" in captured.out
    assert "predict" in captured.err  # the progress bar
    answers = read(out)
    assert [a["text"] for a in answers] == [expected(engine, imgs, q) for q in questions]
    assert answers[0]["model"] == "m"
    assert main(argv) == 0 and "0 answered now, 5 already" in capsys.readouterr().out


def test_cli_predict_sampling_and_stop_flags(setup, tmp_path):
    engine, model, tok, imgs, qfile, questions = setup
    path = save_model(model, tok, tmp_path / "m")
    full = expected(engine, imgs, questions[0], GenerationConfig(max_new_tokens=12))
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece from the middle of question 1's greedy answer
    assert stop.strip() and full.index(stop) > 0

    def run(out, *flags):
        argv = ["predict", "--model", str(path), "--data", str(qfile), "--images", str(imgs), "--out", str(out),
                "--batch-size", "2", "--max-new-tokens", "12", *flags]
        assert main(argv) == 0
        return [a["text"] for a in read(out)]

    cut = run(tmp_path / "stop.jsonl", "--stop", stop, "--stop", "no such text")
    cfg = GenerationConfig(max_new_tokens=12, stop=[stop, "no such text"])
    assert cut == [expected(engine, imgs, q, cfg) for q in questions]
    assert cut[0] == full[:full.index(stop)].strip() and not any(stop in t for t in cut)
    sampling = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]
    sampled = run(tmp_path / "s1.jsonl", *sampling)
    assert run(tmp_path / "s2.jsonl", *sampling) == sampled  # seeded: the same answers again
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert sampled == [expected(engine, imgs, q, cfg) for q in questions]
    assert sampled != [expected(engine, imgs, q, GenerationConfig(max_new_tokens=12)) for q in questions]


def test_cli_predict_skip_bad(setup, tmp_path, capsys):
    engine, model, tok, imgs, qfile, questions = setup
    mixed, bad = mixed_file(tmp_path, imgs, questions)
    path = save_model(model, tok, tmp_path / "m")

    def argv(out, *flags):
        return ["predict", "--model", str(path), "--data", str(mixed), "--images", str(imgs), "--out", str(out),
                "--batch-size", "3", "--max-new-tokens", "6", *flags]

    assert main(argv(tmp_path / "stop.jsonl")) == 1
    assert "error: " in capsys.readouterr().err and not errors_path(tmp_path / "stop.jsonl").exists()
    out = tmp_path / "a.jsonl"
    assert main(argv(out, "--skip-bad")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"9 questions: 5 answered now, 0 already in {out}; 4 bad ones skipped, listed in {out}.errors.jsonl"
    check_listed(out, bad)
    assert [a["text"] for a in read(out)] == [expected(engine, imgs, q) for q in questions]
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--skip-bad" in help_text and "a rerun tries it again" in help_text
