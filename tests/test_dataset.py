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
