"""A plain Hugging Face causal LM (no vision tower) loaded, chatted with and served by the one
engine, rendered with its own chat template; and `vistune data instruct` generating records
through it, all offline."""
from __future__ import annotations

import io
import json
import shutil
import sys

import openai
import pytest
import torch
from conftest import make_causal_lm_dir, noise_image
from live_server import LiveServer, data_url

import vistune
from vistune.cli import main
from vistune.infer.engine import Engine, GenerationConfig, ImagesNotSupported, Prompt
from vistune.serve.api import create_app


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    return make_causal_lm_dir(tokenizer, tmp_path_factory.mktemp("text") / "tiny-lm")


@pytest.fixture(scope="module")
def engine(lm_dir):
    return Engine(vistune.load(lm_dir))


def hf_greedy(lm_dir, messages: list[dict], max_new: int) -> tuple[list[int], list[int]]:
    """transformers' own prompt ids and greedy new ids for ``messages``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir)).eval()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.inference_mode():
        ids = lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    return list(prompt), ids[0, len(prompt):].tolist()


def test_a_causal_lm_directory_answers_as_transformers_does(lm_dir, engine):
    """Rendered by its own chat template, decoded in one batch with a stored template prefix, the
    answers are transformers' greedy ones token for token."""
    assert engine.text_only and engine.name == "tiny-lm"
    questions = [([{"role": "user", "content": "what color is the square?"}], None),
                 ([{"role": "user", "content": "how many objects are there in the image on the left side?"}],
                  "answer in one word")]
    prompts = [Prompt([{"from": "human", "value": m[0]["content"]}], system=s) for m, s in questions]
    run = engine.start(prompts, GenerationConfig(max_new_tokens=12))
    for _ in run:
        pass
    for (messages, system), prompt, row in zip(questions, prompts, run.rows):
        full = ([{"role": "system", "content": system}] if system else []) + messages
        want_prompt, want_new = hf_greedy(lm_dir, full, 12)
        assert engine.encode(prompt).input_ids == want_prompt
        assert row.tokens == want_new
    # a second turn, continuing the first exchange: the same again
    first = run.completions[0].text
    follow = Prompt([{"from": "human", "value": "what color is the square?"}, {"from": "gpt", "value": first},
                     {"from": "human", "value": "and the circle?"}])
    want_prompt, want_new = hf_greedy(lm_dir, [{"role": "user", "content": "what color is the square?"},
                                               {"role": "assistant", "content": first},
                                               {"role": "user", "content": "and the circle?"}], 8)
    assert engine.encode(follow).input_ids == want_prompt
    tokens = engine.start([follow], GenerationConfig(max_new_tokens=8))
    for _ in tokens:
        pass
    assert tokens.rows[0].tokens == want_new


def test_a_text_model_refuses_images_by_name(engine):
    with pytest.raises(ImagesNotSupported, match="tiny-lm is a text-only model: it takes no images"):
        engine.encode(Prompt.ask("what is it?", [noise_image(1)]))
    with pytest.raises(ImagesNotSupported):
        engine.image_embeds([noise_image(1)])


@pytest.mark.parametrize("how", ["no config", "unknown architecture", "llava", "pickled weights", "no tokenizer",
                                 "no chat template"])
def test_what_a_directory_lacks_is_named(lm_dir, tokenizer, tmp_path, how):
    path = tmp_path / "m"
    shutil.copytree(lm_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    if how == "no config":
        (path / "config.json").unlink()
        want = "no config.json"
    elif how == "unknown architecture":
        (path / "config.json").write_text(json.dumps(dict(cfg, model_type="clip")))
        want = "neither a vistune config .* nor a Hugging Face causal LM's .*model_type 'clip'"
    elif how == "llava":
        (path / "config.json").write_text(json.dumps({"model_type": "llava"}))
        want = "run `vistune import` first"
    elif how == "pickled weights":
        (path / "model.safetensors").rename(path / "pytorch_model.bin")
        want = "no \\*.safetensors weights .*never loads pickled weights such as pytorch_model.bin"
    elif how == "no tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (path / f).unlink()
        want = "causal LM but no tokenizer files"
    else:
        (path / "chat_template.jinja").unlink()
        want = "the tokenizer has no chat_template"
    with pytest.raises((OSError, ValueError), match=want):
        vistune.load(path)


def test_cli_chat_and_predict_with_a_text_model(lm_dir, engine, tmp_path, monkeypatch, capsys):
    noise_image(2).save(tmp_path / "cat.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path / 'cat.png'}\nwhat color is it?\n/quit\n"))
    assert main(["chat", "--model", str(lm_dir), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "[error] tiny-lm is a text-only model: it takes no images" in out
    want = engine.generate([Prompt.ask("what color is it?")], GenerationConfig(max_new_tokens=6))[0].text
    assert f"ASSISTANT: {want}\n" in out

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "text": "what color is it?"}) + "\n")
    answers = tmp_path / "a.jsonl"
    assert main(["predict", "--model", str(lm_dir), "--data", str(questions), "--out", str(answers),
                 "--max-new-tokens", "6"]) == 0
    assert json.loads(answers.read_text())["text"] == want


def test_served_text_model_answers_text_and_refuses_images(lm_dir, engine):
    with LiveServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="tiny-lm", max_tokens=8, messages=[
            {"role": "system", "content": "answer in one word"}, {"role": "user", "content": "what color is it?"}])
        want = engine.generate([Prompt.ask("what color is it?", system="answer in one word")],
                               GenerationConfig(max_new_tokens=8))[0].text
        assert reply.choices[0].message.content == want
        streamed = client.chat.completions.create(model="tiny-lm", max_tokens=8, stream=True, messages=[
            {"role": "system", "content": "answer in one word"}, {"role": "user", "content": "what color is it?"}])
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-lm", max_tokens=8, messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": data_url(noise_image(1))}}]}])
        err = e.value.body
        assert err["code"] == "images_not_supported" and err["param"] == "messages[0].content[1].image_url"
        assert "text-only model" in err["message"]


def test_data_instruct_through_a_served_text_model(lm_dir, engine, tmp_path, monkeypatch, capsys):
    """`vistune data instruct --base-url` against the served model: every request is answered (a tiny
    random model's text is then rejected as no description, as the data engine should)."""
    from vistune.instruct.annotations import Box, ImageAnnotation, save_annotations

    anns = [ImageAnnotation(str(i), f"{i:06d}.jpg", 640, 480, [f"a red square left of a blue circle {i}."],
                            [Box("square", (10, 20, 200, 300))]) for i in range(3)]
    save_annotations(anns, tmp_path / "ann.json")
    monkeypatch.setenv("VISTUNE_TEST_KEY", "none")
    with LiveServer(create_app(engine)) as server:
        rc = main(["data", "instruct", "--annotations", str(tmp_path / "ann.json"), "--out", str(tmp_path / "o.jsonl"),
                   "--kinds", "detail", "--model", "tiny-lm", "--base-url", server.url + "/v1",
                   "--api-key-env", "VISTUNE_TEST_KEY", "--max-tokens", "16", "--max-attempts", "1"])
    report = capsys.readouterr().out
    assert rc == 0, report
    assert "0 failed (of 3 jobs)" in report and "3 requests, 0 retries" in report


def test_web_page_handler_with_a_text_model(engine):
    pytest.importorskip("gradio")
    from vistune.serve.web import make_respond

    respond = make_respond(engine, config=GenerationConfig(max_new_tokens=6))
    history, session, box = list(respond("what color is it?", noise_image(3), [], None))[-1]
    assert "text-only model" in history[-1]["content"] and box == "what color is it?"  # the message stays to resend
    history, session, box = list(respond("what color is it?", None, [], session))[-1]
    want = engine.generate([Prompt.ask("what color is it?")], GenerationConfig(max_new_tokens=6))[0].text
    assert history[-1] == {"role": "assistant", "content": want} and box == ""
