import json

import pytest

from eval_helpers import ScriptedGenerator, write_images
from vistune.eval.runner import EvalError, Query, RunSettings, predict, read_jsonl


def _queries(tmp_path, n=5):
    images = write_images(tmp_path / "img", ["a.png"])
    return [Query(str(i), f"question {i}", [images / "a.png"] if i % 2 else []) for i in range(n)]


def _settings(**kw):
    return RunSettings(progress=False, **kw)


def test_batches_limit_and_images(tmp_path):
    gen = ScriptedGenerator(lambda text, imgs: f"{text} with {len(imgs)} image(s)")
    preds = predict(gen, _queries(tmp_path), tmp_path / "out", _settings(batch_size=2, limit=3))
    assert [len(b) for b in gen.batches] == [2, 1]
    assert list(preds) == ["0", "1", "2"] and preds["1"]["text"] == "question 1 with 1 image(s)"
    assert gen.configs[0].max_new_tokens == 128 and gen.configs[0].temperature == 0.0
    rows = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [r["question_id"] for r in rows] == ["0", "1", "2"] and rows[0]["finish_reason"] == "stop"


def test_resume_skips_done_drops_torn_and_stale_lines(tmp_path):
    out = tmp_path / "out"
    qs = _queries(tmp_path)
    gen = ScriptedGenerator(lambda text, imgs: "first")
    predict(gen, qs, out, _settings(limit=3))
    with open(out / "predictions.jsonl", "r+") as f:
        lines = f.read().splitlines()
        # q1 was asked with another prompt (stale); a killed writer left half a line.
        lines[1] = json.dumps({**json.loads(lines[1]), "prompt": "old prompt"})
        f.seek(0)
        f.truncate()
        f.write("\n".join(lines) + '\n{"question_id": "3", "te')
    gen2 = ScriptedGenerator(lambda text, imgs: "second")
    preds = predict(gen2, qs, out, _settings())
    assert [t for b in gen2.batches for t in b] == ["question 1", "question 3", "question 4"]
    assert [preds[k]["text"] for k in "01234"] == ["first", "second", "first", "second", "second"]
    assert len(read_jsonl(out / "predictions.jsonl")) == 5


def test_other_settings_refused_unless_overwrite(tmp_path):
    qs = _queries(tmp_path, 2)
    gen = ScriptedGenerator(lambda text, imgs: "a")
    predict(gen, qs, tmp_path / "out", _settings(), signature={"model": "m1"})
    with pytest.raises(EvalError, match=r"\(max_new_tokens differ\)"):
        predict(gen, qs, tmp_path / "out", _settings(max_new_tokens=5), signature={"model": "m1"})
    with pytest.raises(EvalError, match="model"):
        predict(gen, qs, tmp_path / "out", _settings(), signature={"model": "m2"})
    predict(gen, qs, tmp_path / "out", _settings(overwrite=True), signature={"model": "m2"})
    assert gen.calls == 4
    # Limit and batch size are free to change between resumes.
    predict(gen, qs, tmp_path / "out", _settings(limit=1, batch_size=3), signature={"model": "m2"})
    assert gen.calls == 4


def test_missing_image_named_before_any_generation(tmp_path):
    qs = _queries(tmp_path, 3)
    qs[2].images = [tmp_path / "nope.png"]
    gen = ScriptedGenerator(lambda text, imgs: "a")
    with pytest.raises(EvalError, match=r"question '2': .*nope.png"):
        predict(gen, qs, tmp_path / "out", _settings())
    assert gen.calls == 0


def test_bad_prompt_in_a_batch_is_named(tmp_path):
    def answer(text, imgs):
        if text == "question 2":
            raise ValueError("prompt is 5000 tokens, over the context of 2048")
        return "ok"

    gen = ScriptedGenerator(answer)
    with pytest.raises(EvalError, match="question '2': prompt is 5000 tokens"):
        predict(gen, _queries(tmp_path, 4), tmp_path / "out", _settings(batch_size=4))


def test_duplicate_ids_and_broken_lines(tmp_path):
    qs = _queries(tmp_path, 2)
    qs[1].id = "0"
    with pytest.raises(EvalError, match="'0' occurs more than once"):
        predict(ScriptedGenerator(lambda t, i: "a"), qs, tmp_path / "out", _settings())
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{broken\n{"a": 2}\n')
    with pytest.raises(EvalError, match="x.jsonl:2"):
        read_jsonl(p, tolerate_torn_tail=True)


def test_too_long_prompt_through_real_engine_is_named(tmp_path, tokenizer):
    from conftest import make_model
    from vistune.infer.engine import Engine
    from vistune.model.checkpoint import LoadedModel

    model, tok = make_model(tokenizer, max_length=200)
    engine = Engine(LoadedModel(model, tok))
    qs = [Query("short", "red circle?"), Query("long", " ".join(["blue square on the left"] * 60)), Query("s2", "yes?")]
    out = tmp_path / "out"
    with pytest.raises(EvalError, match="question 'long'"):
        predict(engine, qs, out, _settings(batch_size=3, max_new_tokens=2))
    # Generation stopped at the bad prompt; after fixing the data, a rerun resumes.
    preds = predict(engine, [qs[0], qs[2]], out, _settings(batch_size=3, max_new_tokens=2))
    assert set(preds) == {"short", "s2"} and all(p["completion_tokens"] <= 2 for p in preds.values())
