"""Interleaved multi-image records: <image> anywhere in any human turn, each image its own anyres tiles,
a per-sample bound on visual tokens; trained, then answered by predict and the server."""
from __future__ import annotations

import json

import openai
import torch
from conftest import noise_image
from live_server import LiveServer, data_url
from train_fixtures import tiny_config, tiny_data  # noqa: F401

from vistune.data.anyres import anyres_token_count
from vistune.data.dataset import VLDataset, text_settings_for
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.infer.predict import predict_file
from vistune.serve.api import ServeSettings, create_app
from vistune.train import run

SIZES = {"a.png": (64, 32), "b.png": (32, 64), "c.png": (40, 40), "big.png": (96, 96)}
THREE = {"id": "three", "image": ["a.png", "b.png", "c.png"], "conversations": [
    {"from": "human", "value": "What is in <image> ?"}, {"from": "gpt", "value": "a red square."},
    {"from": "human", "value": "And here: <image> then <image>\nWhich is larger?"},
    {"from": "gpt", "value": "the blue circle on the left."}]}
HUGE = {"id": "too-many-tiles", "image": ["big.png", "big.png", "big.png"], "conversations": [
    {"from": "human", "value": "<image><image><image> same?"}, {"from": "gpt", "value": "yes."}]}


def test_interleaved_three_images_train_and_answer(tiny_data, tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for i, (name, size) in enumerate(SIZES.items()):
        noise_image(seed=i, size=size).save(img_dir / name)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [THREE, HUGE, THREE | {"id": "three-again"}]))
    over = {"model.image_aspect": "anyres", "data.train": str(data), "data.images": str(img_dir),
            "data.max_length": 400, "data.max_image_tokens": 200, "train.max_steps": 2, "train.batch_size": 2, "train.max_bad_records": 1}
    r = run(tiny_config(tiny_data, tmp_path / "run", over))
    # three 88-token images (264) are over the bound: refused by name, the rest trained
    assert [b["id"] for b in r.bad_records] == ["too-many-tiles"]
    assert "over the bound of 200 per sample (data.max_image_tokens)" in r.bad_records[0]["reason"]
    assert r.steps == 2 and r.final_loss > 0

    engine = Engine.from_path(r.model_dir)
    model = engine.model
    text = text_settings_for(model.config, engine.tokenizer, max_length=400)
    sample = VLDataset(data, text, img_dir, model.config.image)[0]
    counts = [anyres_token_count(SIZES[n], model.config.image, model.config.num_image_tokens) for n in THREE["image"]]
    assert len(set(counts)) > 1  # each image its own count
    ids = sample["input_ids"].tolist()
    iid = model.config.image_token_id
    runs, k = [], 0  # the lengths of the image-token runs, in order: the images' counts
    while k < len(ids):
        if ids[k] == iid:
            j = k
            while j < len(ids) and ids[j] == iid:
                j += 1
            runs.append(j - k)
            k = j
        else:
            k += 1
    assert runs == counts

    # predict: a question with the three images, placeholders where the asker put them
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question_id": "q", "image": THREE["image"],
                              "text": "Is <image> like <image> or like <image> ?"}) + "\n")
    predict_file(engine, qs, tmp_path / "a.jsonl", img_dir, progress=False, config=GenerationConfig(max_new_tokens=5))
    answer = json.loads((tmp_path / "a.jsonl").read_text())
    images = [noise_image(seed=i, size=SIZES[n]) for i, n in enumerate(THREE["image"])]
    cfg = GenerationConfig(max_new_tokens=5)
    want = engine.generate([Prompt.ask("Is <image> like <image> or like <image> ?", images)], cfg)[0]
    assert answer["text"] == want.text and answer["metadata"]["prompt_tokens"] == want.prompt_tokens

    # the server: images in two user messages of one conversation
    app = create_app(engine, ServeSettings(api_key="k", max_images_per_request=4, batch_wait_ms=5))
    turns = [{"from": "human", "value": "<image>\nWhat is in it?"}, {"from": "gpt", "value": "a red square."},
             {"from": "human", "value": "<image>\n<image>\nWhich is larger?"}]
    want = engine.generate([Prompt(turns, images)], cfg)[0]
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model=engine.name, max_tokens=5, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}},
                                         {"type": "text", "text": "What is in it?"}]},
            {"role": "assistant", "content": "a red square."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[1])}},
                                         {"type": "image_url", "image_url": {"url": data_url(images[2])}},
                                         {"type": "text", "text": "Which is larger?"}]}])
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == want.prompt_tokens
    assert torch.equal(torch.tensor(engine.encode(Prompt(turns, images)).input_ids).eq(iid).sum(),
                       torch.tensor(sum(counts)))
