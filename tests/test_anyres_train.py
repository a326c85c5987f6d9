"""A tiny AnyRes model trains through both stages, then answers through predict and the engine."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import noise_image
from train_fixtures import tiny_config, tiny_data  # noqa: F401

from vistune.data.anyres import anyres_token_count, grid_shape
from vistune.data.dataset import VLDataset, text_settings_for
from vistune.data.validate import validate_lengths
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.infer.predict import predict_file
from vistune.model.checkpoint import load_model
from vistune.train import run

SIZES = [(64, 32), (32, 96), (50, 40), (96, 96), (40, 33)]


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """Records whose images have several aspect ratios, one of them with two images."""
    d = tmp_path_factory.mktemp("anyres_data")
    (d / "images").mkdir()
    recs = []
    for i, size in enumerate(SIZES):
        noise_image(seed=i, size=size).save(d / "images" / f"im{i}.png")
    for i in range(12):
        a = i % len(SIZES)
        conv = [{"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": f"a red square on the left {i % 3}."}]
        recs.append({"id": f"r{i}", "image": f"im{a}.png", "conversations": conv})
    recs.append({"id": "two", "image": ["im0.png", "im1.png"], "conversations": [
        {"from": "human", "value": "Compare <image> with this: <image>"}, {"from": "gpt", "value": "a red circle."}]})
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"train": path, "images": d / "images"}


def test_anyres_trains_both_stages_and_answers(tiny_data, wide_data, tmp_path):
    over = {"model.image_aspect": "anyres", "data.train": str(wide_data["train"]),
            "data.images": str(wide_data["images"]), "train.max_steps": 2, "data.max_length": 400}
    r1 = run(tiny_config(tiny_data, tmp_path / "s1", over, stage=1))
    m1, _ = load_model(r1.model_dir)
    assert m1.config.image.aspect == "anyres" and m1.config.image.grid_pinpoints[0] == [32, 64]
    from accelerate.utils import set_seed

    from vistune.train.stages import build_model

    set_seed(0)  # the run's own seed: the very model it started from
    m0, _ = build_model(tiny_config(tiny_data, tmp_path / "unused", over, stage=1))
    frozen = m0.vision.state_dict()
    assert all(torch.equal(v, m1.vision.state_dict()[k]) for k, v in frozen.items())  # m0 is where the run began
    # stage 1 trains the newline with the projector
    assert not torch.equal(m0.projector.image_newline, m1.projector.image_newline)

    over2 = {**over, "model": {"from": str(r1.model_dir)}, "data.packing": True, "data.pack_length": 400}
    r2 = run(tiny_config(tiny_data, tmp_path / "s2", over2, stage=2))
    rows = [json.loads(x) for x in r2.metrics_path.read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)

    model, tok = load_model(r2.model_dir)
    text = text_settings_for(model.config, tok)
    ds = VLDataset(wide_data["train"], text, wide_data["images"], model.config.image)
    two = next(ds[i] for i in range(len(ds)) if ds[i]["id"] == "two")
    iid = model.config.image_token_id
    want = sum(anyres_token_count(s, model.config.image, model.config.num_image_tokens) for s in SIZES[:2])
    assert int((two["input_ids"] == iid).sum()) == want
    assert ds.modality_lengths()[two["index"]] >= want  # an estimate counts an anyres image's most tokens
    assert two["image_sizes"].tolist() == [list(SIZES[0]), list(SIZES[1])]
    with torch.no_grad():  # the sample's own ids and tiles fit together
        out = model(two["input_ids"][None], pixel_values=two["pixel_values"], image_sizes=two["image_sizes"],
                    labels=two["labels"][None])
    assert torch.isfinite(out.loss)

    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question_id": 1, "image": "im1.png", "text": "Describe the image."}) + "\n"
                  + json.dumps({"question_id": 2, "image": ["im2.png", "im3.png"], "text": "<image> or <image>?"}) + "\n")
    engine = Engine.from_path(r2.model_dir)
    stats = predict_file(engine, qs, tmp_path / "a.jsonl", wide_data["images"], progress=False,
                         config=GenerationConfig(max_new_tokens=4))
    answers = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert stats.written == 2 and all(a["metadata"]["completion_tokens"] >= 1 for a in answers)
    # a batch answers as each prompt alone; embeddings cached by a chat give the same tokens as the image
    img = noise_image(seed=7, size=(70, 30))
    p1, p2 = Prompt.ask("Describe the image.", [img]), Prompt.ask("What is it?", [noise_image(seed=8, size=(30, 70))])
    cfg = GenerationConfig(max_new_tokens=4)
    both = engine.generate([p1, p2], cfg)
    assert [c.text for c in both] == [engine.generate([p], cfg)[0].text for p in (p1, p2)]
    emb = engine.image_embeds([img])[0]
    assert emb.shape[0] == anyres_token_count((70, 30), model.config.image, model.config.num_image_tokens)
    assert engine.generate([Prompt.ask("Describe the image.", [emb])], cfg)[0].text == both[0].text
    assert engine.encode(p1).input_ids == engine.encode(Prompt.ask("Describe the image.", [emb])).input_ids


def test_lengths_report_and_feature_cache_with_anyres(tiny_data, wide_data, tmp_path, tokenizer):
    from conftest import make_model

    model, tok = make_model(tokenizer, image_aspect="anyres")
    text = text_settings_for(model.config, tok, template="plain", max_length=80)
    problems, cuts = validate_lengths(wide_data["train"], text, wide_data["images"])
    # (96, 96) takes the default grids' 2x2: 16 + 8 x 9 = 88 image tokens > 80: refused by name;
    # (64, 32) takes 16 + 4 x 9 = 52 and fits
    assert any("'r3'" in p.where and "cut into an image" in p.reason for p in problems)
    assert not any("'r0'" in p.where for p in problems)


def test_stage1_from_cached_anyres_features_equals_stage1_from_tiles(tiny_data, wide_data, tmp_path):
    from tolerances import trained_losses

    from vistune.train.features import FeatureCache, read_index

    over = {"model.image_aspect": "anyres", "data.train": str(wide_data["train"]),
            "data.images": str(wide_data["images"]), "train.max_steps": 3, "data.max_length": 400}

    def losses(r):
        return [json.loads(x)["loss"] for x in r.metrics_path.read_text().splitlines()]

    tiles = run(tiny_config(tiny_data, tmp_path / "tiles", over, stage=1))
    cached = run(tiny_config(tiny_data, tmp_path / "cached", {**over, "data.feature_cache": str(tmp_path / "fc")},
                             stage=1))
    # the same tiles through the same tower, batched otherwise: a reordered forward per step
    assert losses(cached) == pytest.approx(losses(tiles), **trained_losses(3))
    index = read_index(tmp_path / "fc")
    assert index["num_records"] == 13 and index["num_images"] == 14
    cache = FeatureCache(tmp_path / "fc")
    two = 12  # the two-image record: each image's size kept, its tiles one after the other
    assert cache.image_sizes(two).tolist() == [list(SIZES[0]), list(SIZES[1])]
    model, _ = load_model(cached.model_dir)
    n_tiles = sum(1 + c * r for c, r in (grid_shape(s, model.config.image) for s in SIZES[:2]))
    assert cache.get(two).shape[:2] == (n_tiles, model.config.num_image_tokens)
