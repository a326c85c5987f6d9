"""Chat sessions (image features reused across turns) and `vistune chat` driven through stdin."""
from __future__ import annotations

import io
import sys

import pytest
from conftest import make_model, noise_image

from vistune.cli import main
from vistune.infer.chat import Chat
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.model.checkpoint import LoadedModel, save_model

CFG = GenerationConfig(max_new_tokens=10)


@pytest.fixture
def engine(tokenizer):
    return Engine(LoadedModel(*make_model(tokenizer)))


def count_vision_calls(engine) -> list:
    calls: list = []
    orig = engine.model.encode_images
    engine.model.encode_images = lambda px: (calls.append(px.shape[0]), orig(px))[1]
    return calls


def test_session_reuses_image_features_and_matches_the_engine(engine):
    calls = count_vision_calls(engine)
    img, img2 = noise_image(1), noise_image(2)
    chat = Chat(engine, config=CFG)
    chat.attach(img)
    a1 = chat.ask("what is in the image?")
    a2 = chat.ask("and what color is it?")
    chat.attach(img2)
    a3 = chat.ask("compare the two")
    assert calls == [1, 1]  # one vision pass per image, none for the later turns
    assert len(chat.turns) == 6 and chat.turns[4]["value"].startswith("<image>\n")
    # Exactly what the engine answers for the whole conversation given as PIL images.
    turns = [{"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": a1},
             {"from": "human", "value": "and what color is it?"}, {"from": "gpt", "value": a2},
             {"from": "human", "value": "<image>\ncompare the two"}]
    engine.image_cache.clear()
    assert engine.generate([Prompt(turns, [img, img2])], CFG)[0].text == a3
    chat.reset()
    assert chat.turns == [] and chat.image_embeds == [] and chat.pending == []


def test_session_stream_records_the_reply(engine):
    chat = Chat(engine, config=CFG)
    pieces = list(chat.stream("hello there"))
    assert chat.turns[-1] == {"from": "gpt", "value": "".join(pieces)}


def test_cli_chat_through_stdin(tokenizer, tmp_path, monkeypatch, capsys):
    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "m")
    img = noise_image(3)
    img.save(tmp_path / "cat.png")
    script = "\n".join([f"/image {tmp_path / 'cat.png'}", "what is it?", "and the color?", "/image missing.png",
                        "/reset", "what is it?", "/bogus", "/quit", "never read"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["chat", "--model", str(path), "--max-new-tokens", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    replies = [ln[len("ASSISTANT: "):] for ln in out.splitlines() if ln.startswith("ASSISTANT: ")]
    assert len(replies) == 3
    eng = Engine(LoadedModel(model, tok))
    cfg = GenerationConfig(max_new_tokens=8)
    first = eng.generate([Prompt.ask("what is it?", [img])], cfg)[0].text
    second = eng.generate([Prompt([{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": first},
                                   {"from": "human", "value": "and the color?"}], [img])], cfg)[0].text
    after_reset = eng.generate([Prompt.ask("what is it?")], cfg)[0].text
    assert replies == [first, second, after_reset]
    assert "[attached" in out and "[conversation cleared]" in out and "[unknown command]" in out
    assert "missing.png" in out.split("[error]")[1].splitlines()[0]  # names the file it could not open
