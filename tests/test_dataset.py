import json

import pytest
import torch
from PIL import Image

from vistune.data.collate import PadCollator
from vistune.data.dataset import SampleError, VLDataset, text_settings_for
from vistune.data.validate import validate_file
from vistune.cli import main


def write_data(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "img" / "red.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    recs = [
        {"id": "ok1", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "txt", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "broken", "image": "broken.png", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "noplace", "image": "red.png", "conversations": [
            {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "order", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        {"id": "ok1", "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "A"}]},
    ]
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_dataset_items_and_errors(tiny_model, tmp_path):
    model, tok = tiny_model
    p = write_data(tmp_path)
    ds = VLDataset(p, text_settings_for(model.config, tok), tmp_path / "img", model.config.image)
    a = ds[0]
    assert a["id"] == "ok1" and a["pixel_values"].shape == (1, 3, 32, 32)
    assert int((a["input_ids"] == model.image_token_id).sum()) == model.config.num_image_tokens
    b = ds[1]
    assert b["pixel_values"] is None
    with pytest.raises(SampleError, match="record 'missing'.*image not found"):
        ds[2]
    with pytest.raises(SampleError, match="record 'broken'.*cannot decode"):
        ds[3]
    with pytest.raises(SampleError, match="record 'noplace'.*no <image> placeholder") as e:
        ds[4]
    assert e.value.record_id == "noplace"  # a malformed record is named by its id, as a bad image's is
    with pytest.raises(SampleError, match="record 'order'.*roles out of order") as e:
        ds[5]
    assert e.value.record_id == "order"
    batch = PadCollator(tok.pad_token_id)([a, b])
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
    assert torch.isfinite(out.loss) and out.num_supervised > 0
    lens = ds.modality_lengths()
    assert lens[0] > 0 and lens[1] < 0


def test_validate_reports_everything(tmp_path, capsys):
    p = write_data(tmp_path)
    n, problems = validate_file(p, tmp_path / "img")
    text = "\n".join(map(str, problems))
    assert n == 7
    for needle in ["'missing'", "'broken'", "'noplace'", "'order'", "duplicate id"]:
        assert needle in text
    assert len(problems) == 5
    rc = main(["data", "validate", str(p), "--images", str(tmp_path / "img")])
    out = capsys.readouterr()
    assert rc == 1 and "5 problem(s)" in out.out and "'broken'" in out.err
    good = tmp_path / "good.jsonl"
    good.write_text(p.read_text().splitlines()[0] + "\n")
    assert main(["data", "validate", str(good), "--images", str(tmp_path / "img")]) == 0
    assert main(["data", "validate", str(good), "--template", "vicuna"]) == 1


def test_validate_with_a_model_names_what_training_would_skip_or_cut(tiny_model, tmp_path, capsys):
    from vistune.data.validate import validate_lengths
    from vistune.model.checkpoint import save_model
    from vistune.text.encode import encode_conversation

    model, tok = tiny_model
    model_dir = save_model(model, tok, tmp_path / "model")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "img" / "red.png")
    long_reply = " ".join(["red circle on the left"] * 12)
    recs = [
        {"id": "fits", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "cut", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": long_reply}]},
        {"id": "image-late", "image": "red.png", "conversations": [
            {"from": "human", "value": long_reply + "\n<image>"}, {"from": "gpt", "value": "Red."}]},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = text_settings_for(model.config, tok)
    lengths = {r["id"]: len(encode_conversation(tok, text.template, r["conversations"],
                                                image_token_id=text.image_token_id,
                                                num_image_tokens=text.num_image_tokens).input_ids) for r in recs}
    limit = lengths["fits"] + 2
    assert lengths["cut"] > limit and lengths["image-late"] > limit

    problems, cuts = validate_lengths(data, text_settings_for(model.config, tok, max_length=limit))
    assert [p.where for p in problems] == ["record 'image-late' (data.jsonl:3)"] and "cut into an image" in problems[0].reason
    assert [c.where for c in cuts] == ["record 'cut' (data.jsonl:2)"]
    assert f"{lengths['cut'] - limit} token(s) longer than max_length {limit}" in cuts[0].reason

    args = ["data", "validate", str(data), "--images", str(tmp_path / "img"), "--model", str(model_dir)]
    assert main(args) == 0  # the model's own max_length (2048) fits all three
    assert "3 records, 0 problem(s), 0 would be cut to max_length" in capsys.readouterr().out
    assert main(args + ["--max-length", str(limit)]) == 1
    out = capsys.readouterr()
    assert "3 records, 1 problem(s), 1 would be cut to max_length" in out.out
    assert "'image-late'" in out.err and "note: record 'cut'" in out.err
    with pytest.raises(SystemExit, match="--max-length and --max-image-tokens need --model"):
        main(["data", "validate", str(data), "--max-length", "10"])
    with pytest.raises(SystemExit, match="not a vistune model directory"):
        main(["data", "validate", str(data), "--model", str(tmp_path / "img")])


def test_cache_tokens_encodes_each_record_once_and_keeps_no_bad_one(tiny_model, tmp_path, monkeypatch):
    import vistune.data.settings as settings_mod  # where TextSettings encodes

    model, tok = tiny_model
    p = write_data(tmp_path)
    with open(p, "a") as f:  # record 7: longer than the context, which only encoding finds out
        f.write(json.dumps({"id": "long", "conversations": [
            {"from": "human", "value": "word " * 5000}, {"from": "gpt", "value": "A"}]}) + "\n")
    text = text_settings_for(model.config, tok)
    plain = VLDataset(p, text, tmp_path / "img", model.config.image)
    expected = [plain[i] for i in (0, 1)]
    calls = []
    real = settings_mod.encode_conversation
    monkeypatch.setattr(settings_mod, "encode_conversation", lambda *a, **k: calls.append(k["record_id"]) or real(*a, **k))
    ds = VLDataset(p, text, tmp_path / "img", model.config.image, cache_tokens=True)
    for _epoch in range(3):
        for i, want in zip((0, 1), expected):
            got = ds[i]
            assert got["id"] == want["id"] and torch.equal(got["input_ids"], want["input_ids"])
            assert torch.equal(got["labels"], want["labels"])
        assert torch.equal(ds[0]["pixel_values"], expected[0]["pixel_values"])  # images are still read
        with pytest.raises(SampleError, match="record 'long'"):
            ds[7]
        with pytest.raises(SampleError, match="record 'missing'.*image not found"):
            ds[2]
    # encoded once each; the record too long is tried again every epoch, never kept
    assert calls.count("ok1") == 1 and calls.count("txt") == 1 and calls.count("long") == 3
