import json

from vistune.cli import main
from vistune.data.records import load_records
from vistune.instruct.annotations import ImageAnnotation, save_annotations
from vistune.instruct.instructions import BRIEF_INSTRUCTIONS
from vistune.instruct.pairs import make_pairs

ANNS = [ImageAnnotation(str(i), f"{i}.jpg", 64, 64, [f"Caption {i}.{k}." for k in range(5)]) for i in range(30)]


def _instruction(rec: dict) -> str:
    return rec["conversations"][0]["value"].replace("<image>", "").strip()


def test_one_caption_per_image_seeded():
    recs = make_pairs(ANNS, seed=3)
    assert [r["id"] for r in recs] == [a.id for a in ANNS]
    for r, a in zip(recs, ANNS):
        assert r["image"] == a.file and r["kind"] == "caption"
        assert r["conversations"][1] == {"from": "gpt", "value": r["conversations"][1]["value"]}
        assert r["conversations"][1]["value"] in a.captions
        assert _instruction(r) in BRIEF_INSTRUCTIONS
    assert recs == make_pairs(ANNS, seed=3)
    assert recs != make_pairs(ANNS, seed=4)
    # Drawn at random: several captions, several phrasings, the image on both sides.
    assert len({r["conversations"][1]["value"].split(".")[1] for r in recs}) > 2
    assert len({_instruction(r) for r in recs}) > 5
    assert {r["conversations"][0]["value"].startswith("<image>") for r in recs} == {True, False}
    # A record does not change when other images come and go.
    assert make_pairs(ANNS[5:7], seed=3) == recs[5:7]


def test_all_captions_and_missing_captions(caplog):
    anns = ANNS[:2] + [ImageAnnotation("empty", "e.jpg", 8, 8, ["  "])]
    recs = make_pairs(anns, all_captions=True)
    assert [r["id"] for r in recs] == [f"{i}-{k}" for i in range(2) for k in range(5)]
    assert [r["conversations"][1]["value"] for r in recs[:5]] == ANNS[0].captions
    assert "1 image(s) have no caption and were skipped (first: empty)" in caplog.text


def test_cli_pairs(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    save_annotations(ANNS[:4], ann)
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", "--annotations", str(ann), "--out", str(out), "--seed", "1"]) == 0
    recs = load_records(out)  # valid LLaVA records
    assert [r.id for r in recs] == ["0", "1", "2", "3"] and all(r.num_placeholders == 1 for r in recs)
    assert [json.loads(line) for line in out.read_text().splitlines()] == make_pairs(ANNS[:4], seed=1)
    assert "4 records written" in capsys.readouterr().out
