import json

import pytest

from vistune.data.records import RecordError, RecordFile, load_records, parse_record, write_records

GOOD = {"id": "a1", "image": "x.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}


def test_parse_single_and_multi_image():
    r = parse_record(GOOD)
    assert r.images == ["x.png"] and r.num_placeholders == 1
    multi = dict(GOOD, image=["a.png", "b.png"], conversations=[
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Two."}])
    assert parse_record(multi).images == ["a.png", "b.png"]
    text_only = {"id": 3, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    r = parse_record(text_only)
    assert r.id == "3" and r.images == []


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.pop("id"), "missing 'id'"),
    (lambda d: d.update(conversations=[]), "non-empty list"),
    (lambda d: d.update(image=5), "path or a list"),
    (lambda d: d["conversations"].reverse(), "roles out of order"),
    (lambda d: d["conversations"][1].update(value=""), "empty turn"),
    (lambda d: d["conversations"][1].update(value=42), r"turn 1 \(gpt\): 'value' is not a string \(int 42\)"),
    (lambda d: d["conversations"][0].update(value="no placeholder"), "no <image> placeholder"),
    (lambda d: d.pop("image"), "placeholder\\(s\\) but no image"),
    (lambda d: d["conversations"][0].update(**{"from": "bot"}), "unknown role"),
    (lambda d: d["conversations"].append({"from": "human", "value": "more?"}), "last turn is not an assistant"),
    (lambda d: d["conversations"][1].update(value="<image> here"), "placeholder in an assistant reply"),
    (lambda d: d.update(image=["a.png", "b.png"]), "2 image\\(s\\) but 1"),
])
def test_bad_records_named(mutate, msg):
    d = json.loads(json.dumps(GOOD))
    mutate(d)
    with pytest.raises(RecordError, match=msg) as e:
        parse_record(d, "f.json[0]")
    assert "f.json" in str(e.value)


def test_jsonl_lazy_with_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + "{not json\n" + json.dumps(dict(GOOD, id="a2")) + "\n")
    rf = RecordFile(p)
    assert len(rf) == 3
    assert rf[0].id == "a1" and rf[2].id == "a2"
    with pytest.raises(RecordError, match="d.jsonl:3: not valid JSON"):
        rf[1]


def test_json_list_and_roundtrip(tmp_path):
    recs = [parse_record(GOOD), parse_record(dict(GOOD, id="b", image=["p.png", "q.png"], conversations=[
        {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "ok"}]))]
    for name in ("d.json", "d.jsonl"):
        write_records(recs, tmp_path / name)
        back = load_records(tmp_path / name)
        assert [r.to_json() for r in back] == [r.to_json() for r in recs]
    with pytest.raises(RecordError, match="list of records"):
        (tmp_path / "bad.json").write_text('{"id": 1}')
        RecordFile(tmp_path / "bad.json")
