"""`vistune data curate`: describe with a model, rewrite through a scripted OpenAI-compatible server, filter."""
from __future__ import annotations

import json

import pytest
from conftest import make_model, noise_image
from openai_stub import USAGE, StubLLM

from vistune.cli import main
from vistune.infer.describe import CONTINUE_PROMPT, describe_batch
from vistune.infer.engine import Engine
from vistune.infer.types import GenerationConfig
from vistune.instruct.curate import REWRITE_PROMPT, check_description
from vistune.model.checkpoint import LoadedModel, save_model
from vistune.text.templates import MINIGPT4_INSTRUCTIONS

GOOD = ("The image shows a small red circle near the left side of a white background. Next to it there is a "
        "large blue square, and at the top right a green triangle sits above both of them. The shapes are flat "
        "and evenly lit, and nothing else is in the picture.")
REPEATED = "The image shows a red circle on a white background. " * 6
REFUSAL = "I'm sorry, but I cannot see the image you are referring to. " + GOOD
FRENCH = ("L'image montre un petit cercle rouge pr\u00e8s du bord gauche d'un fond blanc. \u00c0 c\u00f4t\u00e9 se "
          "trouve un grand carr\u00e9 bleu, et en haut \u00e0 droite un triangle vert au-dessus des deux. Les formes "
          "sont plates et uniform\u00e9ment \u00e9clair\u00e9es, et rien d'autre n'appara\u00eet dans la photo.")
SHORT = "A red circle."


@pytest.mark.parametrize("text,reason", [(GOOD, None), (REPEATED, "repetition"), (REFUSAL, "refusal"),
                                         (FRENCH, "non-English"), (SHORT, "too short"),
                                         (" ".join([GOOD] * 3), "repetition"),
                                         (GOOD + " " + " ".join(f"word{i} and more" for i in range(200)), "too long")])
def test_rules_name_why_a_description_is_dropped(text, reason):
    assert check_description(text) == reason


class RewriteLLM(StubLLM):
    """Answers the n-th rewrite request with the n-th scripted reply (a status int, or text)."""

    def __init__(self, replies):
        super().__init__()
        self.replies = replies
        self.paragraphs: list[str] = []

    def handle(self, h, body):
        content = body["messages"][-1]["content"]
        assert content.startswith(REWRITE_PROMPT)
        with self.lock:
            self.paragraphs.append(content.split("Paragraph: ", 1)[1])
            reply = self.replies[min(len(self.paragraphs), len(self.replies)) - 1]
        if isinstance(reply, int):
            payload, status = {"error": {"message": "scripted", "type": "stub", "code": None}}, reply
        else:
            status = 200
            payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": reply}}],
                       "usage": {**USAGE, "total_tokens": sum(USAGE.values())}}
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture
def curate_setup(tokenizer, tmp_path):
    model, tok = make_model(tokenizer)
    save_model(model, tok, tmp_path / "model")
    (tmp_path / "images").mkdir()
    for i in range(5):
        noise_image(i).save(tmp_path / "images" / f"im{i}.png")
    return tmp_path


def test_curate_end_to_end_against_a_scripted_llm_and_resume(curate_setup, capsys):
    tmp = curate_setup
    # one request at a time: the n-th reply goes to the n-th image; the first request fails once (retried)
    replies = [500, GOOD, REFUSAL, REPEATED, FRENCH, SHORT]
    args = ["data", "curate", "--model", str(tmp / "model"), "--images", str(tmp / "images"), "--out",
            str(tmp / "out"), "--llm-model", "stub", "--concurrency", "1", "--backoff", "0.01", "--batch-size", "2",
            "--max-new-tokens", "6", "--min-tokens", "4"]
    with RewriteLLM(replies) as llm:
        assert main(args + ["--base-url", llm.url]) == 0
        assert len(llm.paragraphs) == 6
    out = tmp / "out"
    descriptions = [json.loads(x) for x in (out / "descriptions.jsonl").read_text().splitlines()]
    assert [d["id"] for d in descriptions] == [f"im{i}" for i in range(5)]
    assert all(d["image"] == f"{d['id']}.png" and d["description"] for d in descriptions)
    # what the LLM was asked to rewrite is the model's descriptions, in order (the failed one asked twice)
    assert llm.paragraphs[1:] == [d["description"] for d in descriptions]
    records = [json.loads(x) for x in (out / "curated.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["im0"]
    r = records[0]
    assert r["image"] == "im0.png" and r["conversations"][1] == {"from": "gpt", "value": GOOD}
    assert r["conversations"][0]["value"].removeprefix("<image>\n") in MINIGPT4_INSTRUCTIONS
    report = (out / "report.md").read_text()
    assert "5 descriptions: 1 kept, 4 dropped." in report
    for rid, reason in [("im1", "refusal"), ("im2", "repetition"), ("im3", "non-English"), ("im4", "too short")]:
        assert f"| {rid} | {reason} |" in report
    # a rerun asks nothing again and writes the same records
    first = (out / "curated.jsonl").read_text()
    with RewriteLLM([GOOD]) as llm2:
        assert main(args + ["--base-url", llm2.url]) == 0
        assert llm2.paragraphs == []
    assert (out / "curated.jsonl").read_text() == first
    assert "described 0 image(s) (5 already done" in capsys.readouterr().out


def test_curate_failed_rewrites_are_reported_and_retried_on_rerun(curate_setup, capsys):
    tmp = curate_setup
    args = ["data", "curate", "--model", str(tmp / "model"), "--images", str(tmp / "images"), "--out",
            str(tmp / "out"), "--llm-model", "stub", "--max-attempts", "1", "--limit", "2", "--max-new-tokens", "4"]
    with RewriteLLM([500]) as llm:
        assert main(args + ["--base-url", llm.url]) == 1
    assert "not rewritten (the LLM failed; rerun to retry)" in (tmp / "out" / "report.md").read_text()
    with RewriteLLM([GOOD]) as llm:
        assert main(args + ["--base-url", llm.url]) == 0
        assert len(llm.paragraphs) == 2
    assert len((tmp / "out" / "curated.jsonl").read_text().splitlines()) == 2
    assert main(["data", "curate", "--model", str(tmp / "model"), "--images", str(tmp / "nowhere"), "--out",
                 str(tmp / "o2"), "--llm-model", "stub", "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--images: folder not found" in capsys.readouterr().err
    assert main(["data", "curate", "--model", str(tmp / "model"), "--images", str(tmp / "images"), "--out",
                 str(tmp / "o3"), "--llm-model", "gpt-4o-mini", "--api-key-env", "VISTUNE_NO_SUCH_KEY"]) == 1
    assert "no API key" in capsys.readouterr().err and not (tmp / "o3").exists()


def test_short_descriptions_are_continued_in_the_same_conversation(tokenizer):
    model, tok = make_model(tokenizer)
    engine = Engine(LoadedModel(model, tok))
    batch = [(f"i{i}", f"i{i}.png", noise_image(i)) for i in range(3)]
    cfg = GenerationConfig(max_new_tokens=3)
    once = describe_batch(engine, batch, cfg, min_tokens=0, max_continues=2, prompt="Describe it.")
    assert all(r["continues"] == 0 for r in once)
    seen = []
    real = engine.generate

    def spy(prompts, config=None):
        seen.append([p.turns for p in prompts])
        return real(prompts, config)

    engine.generate = spy
    longer = describe_batch(engine, batch, cfg, min_tokens=1000, max_continues=2, prompt="Describe it.")
    assert [len(s) for s in seen] == [3, 3, 3]  # each round batched
    assert seen[1][0][2] == {"from": "human", "value": CONTINUE_PROMPT}
    assert seen[1][0][1]["value"] == once[0]["description"]  # the first reply, greedy, is the one continued
    for r, o in zip(longer, once):
        assert r["continues"] == 2 and r["description"].startswith(o["description"])
        assert r["tokens"] > o["tokens"]
