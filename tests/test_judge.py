"""The judge flow against a loopback OpenAI-compatible stub, through the real `openai` client."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval_helpers import ScriptedGenerator, saved_model, write_images, write_jsonl  # noqa: F401 (fixture)
from vistune.cli import main
from vistune.eval.judge import (
    REFERENCE_SYSTEM, JudgeSettings, context_text, evaluate, parse_scores, score,
)
from vistune.eval.runner import EvalError, RunSettings

# What the stub judge says per question: "<reference score> <model score>" or junk.
VERDICTS = {"What is the dog doing?": "8 6", "What color is the ball?": "10, 9",
            "Describe the image in detail.": "5 5", "Why is this funny?": "4 2",
            "What could happen next?": "I cannot decide between them."}


class StubLLM:
    """A minimal OpenAI chat-completions endpoint on 127.0.0.1 that records requests."""

    def __init__(self):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                content = stub.reply(body["messages"])
                out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def reply(messages: list[dict]) -> str:
        user = messages[-1]["content"]
        question = user.split("[Question]\n", 1)[1].split("\n", 1)[0]
        if messages[0]["content"] == REFERENCE_SYSTEM:
            return f"Reference answer to: {question}"
        return VERDICTS[question] + "\nAssistant 1 was more detailed."

    def roles(self) -> list[str]:
        return ["reference" if r["messages"][0]["content"] == REFERENCE_SYSTEM else "review" for r in self.requests]


@pytest.fixture
def stub():
    s = StubLLM()
    yield s
    s.server.shutdown()
    s.server.server_close()


def _bench(tmp_path):
    qs = [
        {"question_id": 0, "image": "001.jpg", "text": "What is the dog doing?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "What color is the ball?", "category": "conv",
         "reference": "The ball is red."},
        {"question_id": 2, "image": "002.jpg", "text": "Describe the image in detail.", "category": "detail"},
        {"question_id": 3, "image": "002.jpg", "text": "Why is this funny?", "category": "complex"},
        {"question_id": 4, "image": "001.jpg", "text": "What could happen next?", "category": "complex"},
    ]
    ctx = [{"id": "001", "image": "001.jpg", "caption": "A dog plays with a red ball on grass."},
           {"image": "002.jpg", "captions": ["A cat wears a hat.", "A cat in a party hat."],
            "instances": [{"category": "cat", "bbox": [0.1, 0.2, 0.5, 0.9]}]}]
    return (write_jsonl(tmp_path / "q.jsonl", qs), write_jsonl(tmp_path / "ctx.jsonl", ctx),
            write_images(tmp_path / "img", ["001.jpg", "002.jpg"]))


@pytest.mark.parametrize("review, scores", [
    ("8 6\nbecause", (8.0, 6.0)), ("7,5", (7.0, 5.0)), ("9.5 8\n", (9.5, 8.0)),
    ("Assistant 1: 8\nAssistant 2: 6\n7 5", (7.0, 5.0)),  # first line fails: a later two-number line
    ("8/10 and 6/10", None), ("", None), ("Scores: 8 6 7", None),
])
def test_parse_scores(review, scores):
    assert parse_scores(review) == scores


def test_context_text_forms():
    assert context_text({"image": "a", "caption": "A dog."}) == "A dog."
    assert context_text({"captions": ["A.", "B."], "instances": [{"category": "dog", "bbox": [0.1, 0.25, 0.5, 1]}]}) \
        == "A.\nB.\n\ndog: [0.100, 0.250, 0.500, 1]"
    # vistune's annotation form: pixel boxes are normalised like the data engine does.
    assert context_text({"id": "x", "image": "x.png", "width": 200, "height": 100, "captions": ["C."],
                         "boxes": [{"category": "cat", "bbox": [20, 10, 100, 50]}]}) == "C.\n\ncat: [0.100, 0.100, 0.500, 0.500]"


def test_score_by_hand():
    rows = [{"question_id": "0", "category": "a", "scores": [8, 6]}, {"question_id": "1", "category": "a", "scores": [10, 9]},
            {"question_id": "2", "category": "b", "scores": [4, 2]}, {"question_id": "3", "category": "b", "scores": None}]
    m = score(rows)
    assert m["by"]["category"]["a"]["relative_score"] == pytest.approx(100 * 7.5 / 9)
    assert m["by"]["category"]["b"]["relative_score"] == pytest.approx(50.0)
    assert m["relative_score"] == pytest.approx(100 * (17 / 3) / (22 / 3))
    assert m["unparsed_reviews"] == ["3"] and m["scored"] == 3


def test_bench_flow_through_openai_client_is_cached(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    qs, ctx, images = _bench(tmp_path)
    answers = {"What is ": "It runs.", "What col": "Red.", "Describe": "A cat.", "Why is t": "Hat.", "What cou": "Rain."}
    gen = ScriptedGenerator(lambda text, imgs: answers[text[:8]])
    js = JudgeSettings(judge_model="judge-x", base_url=stub.url, api_key_env="STUB_KEY", workers=2)
    out = tmp_path / "out"
    m = evaluate(gen, qs, ctx, images, out, RunSettings(progress=False), js)

    # 4 references written (one was given), then 5 reviews; all through /v1/chat/completions.
    assert sorted(stub.roles()) == ["reference"] * 4 + ["review"] * 5
    assert {r["path"] for r in stub.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in stub.requests} == {"Bearer sk-test"}
    assert all(r["model"] == "judge-x" and r["temperature"] == 0.2 for r in stub.requests)
    review = next(r for r in stub.requests if "[Assistant 2]\nHat." in r["messages"][-1]["content"])
    text = review["messages"][-1]["content"]
    assert "[Context]\nA cat wears a hat.\nA cat in a party hat.\n\ncat: [0.100, 0.200, 0.500, 0.900]" in text
    assert "[Assistant 1]\nReference answer to: Why is this funny?" in text
    given = next(r for r in stub.requests if "[Assistant 2]\nRed." in r["messages"][-1]["content"])
    assert "[Assistant 1]\nThe ball is red." in given["messages"][-1]["content"]

    # Hand computed: conversation (8,6),(10,9) -> 7.5/9; detail 5/5; complex (4,2) -> 50%; q4 unparsed.
    cat = m["by"]["category"]
    assert cat["conversation"]["relative_score"] == pytest.approx(100 * 7.5 / 9)
    assert cat["detail"]["relative_score"] == pytest.approx(100.0)
    assert cat["complex"]["relative_score"] == pytest.approx(50.0) and cat["complex"]["count"] == 1
    assert m["relative_score"] == pytest.approx(100 * 5.5 / 6.75)
    assert m["unparsed_reviews"] == ["4"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["relative_score"] == pytest.approx(m["relative_score"]) and "accuracy" not in saved
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows[1]["reference_source"] == "given" and rows[0]["scores"] == [8.0, 6.0] and rows[4]["scores"] is None
    assert "Unparseable reviews" in (out / "report.md").read_text() and (out / "bench.png").is_file()

    # A rerun calls nothing: answers come from predictions.jsonl, LLM replies from the cache.
    n = len(stub.requests)
    again = evaluate(gen, qs, ctx, images, out, RunSettings(progress=False), js)
    assert len(stub.requests) == n and gen.calls == 5 and again["relative_score"] == m["relative_score"]

    # A changed model answer invalidates exactly that question's review.
    answers["Describe"] = "A cat in a hat."
    evaluate(gen, qs, ctx, images, out, RunSettings(progress=False, overwrite=True), js)
    new = stub.requests[n:]
    assert [stub.reply(r["messages"]) for r in new] == ["5 5\nAssistant 1 was more detailed."]


def test_resume_after_a_torn_cache_line(tmp_path, stub):
    qs, ctx, images = _bench(tmp_path)
    gen = ScriptedGenerator(lambda text, imgs: "An answer.")
    js = JudgeSettings(judge_model="j", base_url=stub.url, api_key_env="UNSET_VISTUNE_KEY")
    out = tmp_path / "out"
    evaluate(gen, qs, ctx, images, out, RunSettings(progress=False, limit=2), js)
    n = len(stub.requests)  # 1 reference + 2 reviews
    with open(out / "judge_cache.jsonl", "a") as f:
        f.write('{"question_id": "2", "role": "revi')  # a writer killed mid-line
    m = evaluate(gen, qs, ctx, images, out, RunSettings(progress=False), js)
    assert len(stub.requests) - n == 3 + 3  # references for q2-q4, reviews for q2-q4
    assert m["count"] == 5


def test_missing_key_and_context_are_clear_errors(tmp_path, monkeypatch):
    qs, ctx, images = _bench(tmp_path)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    gen = ScriptedGenerator(lambda t, i: "x")
    with pytest.raises(EvalError, match="NO_SUCH_KEY_VAR"):
        evaluate(gen, qs, ctx, images, tmp_path / "o", RunSettings(progress=False),
                 JudgeSettings(judge_model="j", api_key_env="NO_SUCH_KEY_VAR"))
    assert gen.calls == 0
    write_jsonl(ctx, [{"image": "001.jpg", "caption": "only one"}])
    with pytest.raises(EvalError, match="question '2'.*002.jpg"):
        evaluate(gen, qs, ctx, images, tmp_path / "o", RunSettings(progress=False),
                 JudgeSettings(judge_model="j", base_url="http://127.0.0.1:9/v1"))
    assert gen.calls == 0


def test_eval_bench_cli_through_real_engine(tmp_path, stub, saved_model, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_KEY", "sk-cli")
    qs, ctx, images = _bench(tmp_path)
    out = tmp_path / "out"
    rc = main(["eval", "bench", "--model", str(saved_model), "--questions", str(qs), "--context", str(ctx),
               "--images", str(images), "--judge-model", "gpt-judge", "--base-url", stub.url,
               "--api-key-env", "JUDGE_KEY", "--out", str(out), "--max-new-tokens", "4", "--limit", "4",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["count"] == 4 and m["judge_model"] == "gpt-judge"
    assert m["relative_score"] == pytest.approx(100 * (6 + 9 + 5 + 2) / (8 + 10 + 5 + 4))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    reviews = [r["messages"][-1]["content"] for r in stub.requests if r["messages"][0]["content"] != REFERENCE_SYSTEM]
    for row in rows:  # the judge saw exactly what the engine answered
        review = next(t for t in reviews if f"[Question]\n{row['prompt']}\n" in t)
        assert f"[Assistant 2]\n{row['text'].strip()}\n" in review
