"""The tiny data set: scenes of the synthetic world with one object, short true answers."""
from __future__ import annotations

import json

from PIL import Image
from transformers import AutoTokenizer

from vistune.instruct.annotations import load_annotations
from vistune.instruct.synth import COLORS, SHAPES, location_phrase, name
from vistune.instruct.tiny_data import make_tiny_data
from vistune.text.encode import encode_conversation


def test_records_describe_the_worlds_one_object_scenes_truly_and_briefly(tmp_path):
    d = make_tiny_data(tmp_path / "d", n_images=24, seed=0)  # as the training tests' fixture
    anns = {a.file.removeprefix("images/"): a for a in load_annotations(d["dir"] / "annotations.json")}
    assert len(anns) == 24 and all(len(a.boxes) == 1 for a in anns.values())
    pretrain = [json.loads(x) for x in d["pretrain"].read_text().splitlines()]
    instruct = [json.loads(x) for x in d["instruct"].read_text().splitlines()]
    for r in pretrain:
        a = anns[r["image"]]
        assert Image.open(d["images"] / r["image"]).size == (32, 32)
        b = a.boxes[0]
        assert b.attributes["color"] in COLORS and b.attributes["shape"] in SHAPES
        assert r["conversations"][1]["value"] == f"a {name(b)} {location_phrase(b, 32, 32)}."
    answers = {r["conversations"][0]["value"].split("\n")[-1]: r for r in instruct if "image" in r}
    b = anns[answers["What color is the shape?"]["image"]].boxes[0]
    assert answers["What color is the shape?"]["conversations"][1]["value"] == f"The shape is {b.attributes['color']}."
    b = anns[answers["Where is the shape?"]["image"]].boxes[0]
    assert location_phrase(b, 32, 32) in answers["Where is the shape?"]["conversations"][1]["value"]
    assert {r["id"] for r in instruct if "image" not in r} == {"text-0", "text-1", "text-2"}

    # Short enough that the training tests' 160-token runs keep supervised tokens of every
    # record, and only the detailed descriptions run past 160 (none past 256).
    tok = AutoTokenizer.from_pretrained(str(d["tokenizer"]))
    img = tok.convert_tokens_to_ids("<image>")
    lengths = {}
    for r in instruct:
        n = 16 if "image" in r else 0
        cut = encode_conversation(tok, "v0", r["conversations"], image_token_id=img, num_image_tokens=n,
                                  max_length=160)  # raises SampleTooLong if no supervised token is left
        assert any(x != -100 for x in cut.labels)
        lengths[r["id"]] = len(cut) + cut.cut
    long = {i for i, n in lengths.items() if n > 160}
    details = {r["id"] for r in instruct if r["conversations"][0]["value"].endswith("in detail.")}
    assert long and long <= details and max(lengths.values()) <= 256, lengths
    for r in pretrain:
        assert len(encode_conversation(tok, "plain", r["conversations"], image_token_id=img, num_image_tokens=16)) <= 64
