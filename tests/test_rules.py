import json
import re

import pytest

from vistune.data.records import parse_record
from vistune.instruct.annotations import Box, ImageAnnotation
from vistune.instruct.rules import (KINDS, QUESTION_KINDS, SHORT_SUFFIX, RulesError, generate_mix, generate_records,
                                   short_answer_questions)
from vistune.instruct.synth import NUMBER_WORDS, make_world, phrasings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("w"), 120, seed=11)


def objects(ann):
    return {(b.attributes["color"], b.attributes["shape"]): b for b in ann.boxes}


def check_qa(ann, q: str, a: str) -> bool | None:
    """Independent check of one question/answer against the scene; None if the form is unknown."""
    q = q.replace(SHORT_SUFFIX, "").strip()
    a = a.strip().rstrip(".").lower()
    objs = objects(ann)
    if m := re.match(r"(?:what color is|which color does|what is the color of) the (\w+)", q, re.I):
        (c,) = [c for (c, s) in objs if s == m.group(1)]
        return a.endswith(c)
    if m := re.match(r"(?:what shape is|which shape is|what is the shape of) the (\w+)|which shape is (\w+)", q, re.I):
        col = m.group(1) or m.group(2)
        (s,) = [s for (c, s) in objs if c == col]
        return a.endswith(s)
    if re.match(r"how many (objects|shapes)|count the shapes", q, re.I):
        return NUMBER_WORDS[len(ann.boxes)] in a.split()
    if m := re.match(r"how many (\w+)s are there", q, re.I):
        return NUMBER_WORDS[sum(s == m.group(1) for (c, s) in objs)] in a.split()
    if m := re.match(r"(?:is there a|do you see a) (\w+) (\w+)", q, re.I):
        return a.startswith("yes" if (m.group(1), m.group(2)) in objs else "no")
    if m := re.match(r"is the (\w+) (\w+) to the left or to the right of the (\w+) (\w+)", q, re.I):
        A, B = objs[(m.group(1), m.group(2))], objs[(m.group(3), m.group(4))]
        return ("left" if A.center[0] < B.center[0] else "right") in a.split()
    if m := re.match(r"is the (\w+) (\w+) above or below the (\w+) (\w+)", q, re.I):
        A, B = objs[(m.group(1), m.group(2))], objs[(m.group(3), m.group(4))]
        return ("above" if A.center[1] < B.center[1] else "below") in a.split()
    if m := re.match(r"(?:is the|how big is the) (\w+) (\w+)", q, re.I):
        return objs[(m.group(1), m.group(2))].attributes["size"] in a.split()
    return None


def test_every_answer_is_true_of_its_scene(world):
    recs = generate_records(world, seed=0)
    by_id = {a.id: a for a in world}
    checked = 0
    for r in recs:
        parse_record(r)  # valid LLaVA records
        ann = by_id[r["id"].rsplit("-", 1)[0]]
        conv = r["conversations"]
        if r["kind"] == "conversation":
            for h, g in zip(conv[::2], conv[1::2]):
                q = h["value"].replace("<image>", "").strip()
                ok = check_qa(ann, q, g["value"])
                assert ok is not None, q
                assert ok, (r["id"], q, g["value"])
                checked += 1
        elif r["kind"] == "detail":
            text = conv[1]["value"]
            n = len(ann.boxes)
            assert NUMBER_WORDS[n] in text
            for b in objects(ann).values():
                assert any(f in text for f in phrasings(b, with_size=True)), text
        else:
            q, a = conv[0]["value"].replace("<image>", "").strip(), conv[1]["value"]
            n = len(ann.boxes)
            if q.startswith("If the"):
                assert a.rstrip(".").endswith(f"{NUMBER_WORDS[n - 1]} {'object remains' if n == 2 else 'objects remain'}")
            elif q.startswith("Suppose"):
                col = re.search(r"repainted (\w+)", q).group(1)
                now = sum(c == col for (c, s) in objects(ann))
                assert f"{NUMBER_WORDS[now + 1]} {col}" in a
            elif q.startswith("Which object is closest to the top"):
                top = min(ann.boxes, key=lambda b: b.center[1])
                assert a.rstrip(".").endswith(f"the {top.attributes['color']} {top.attributes['shape']} is closest to the top")
            elif q.startswith("Are there more large"):
                big = sum(b.attributes["size"] == "large" for b in ann.boxes)
                assert a.rstrip(".").endswith("large objects" if big * 2 > n else "small objects")
            else:
                pytest.fail(f"unknown reasoning question {q!r}")
            assert len(a.split()) > 12  # explains its steps
    assert checked > 300


def test_all_kinds_and_varied_phrasing(world):
    recs = generate_records(world, seed=0)
    assert {r["kind"] for r in recs} == set(KINDS)
    firsts = {r["conversations"][0]["value"].replace("<image>", "").strip() for r in recs if r["kind"] == "detail"}
    assert len(firsts) >= 10
    placements = {r["conversations"][0]["value"].startswith("<image>") for r in recs}
    assert placements == {True, False}
    assert all(r["conversations"][i]["value"].count("<image>") == (1 if i == 0 else 0)
               for r in recs for i in range(len(r["conversations"])))


def test_deterministic_under_seed(world):
    assert generate_records(world, seed=3) == generate_records(world, seed=3)
    assert generate_records(world, seed=3) != generate_records(world, seed=4)


def test_short_answer_questions_are_true(world):
    qs = short_answer_questions(world, seed=0)
    by_id = {a.id: a for a in world}
    kinds = {q["kind"] for q in qs}
    assert kinds == {"color", "shape", "count", "existence", "position", "size"}
    for q in qs:
        assert q["text"].endswith(SHORT_SUFFIX) and len(q["answer"].split()) == 1
        assert check_qa(by_id[q["question_id"].rsplit("-", 1)[0]], q["text"], q["answer"]), q
    yes = sum(q["answer"] == "yes" for q in qs if q["kind"] == "existence")
    n = sum(q["kind"] == "existence" for q in qs)
    assert 0.3 < yes / n < 0.7


def test_vqa_records_ask_every_kind_once_in_a_word(world):
    recs = generate_records(world, kinds=["vqa"], seed=0)
    by_id = {a.id: a for a in world}
    for r in recs:
        parse_record(r)
        ann, conv = by_id[r["id"].rsplit("-", 1)[0]], r["conversations"]
        assert 4 <= len(conv) // 2 <= len(QUESTION_KINDS)
        for h, g in zip(conv[::2], conv[1::2]):
            q = h["value"].replace("<image>", "").strip()
            assert q.endswith(SHORT_SUFFIX) and len(g["value"].split()) == 1
            assert check_qa(ann, q, g["value"]), (r["id"], q, g["value"])
    # the kinds come in varied order: the first questions do not all open alike
    assert len({r["conversations"][0]["value"].replace("<image>", "").strip().split()[0] for r in recs}) > 3


def test_generate_mix_gives_the_asked_proportions(world):
    recs = generate_mix(world, {"vqa": 2, "detail": 0.25}, seed=1)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("vqa") == 2 * len(world) and kinds.count("detail") == round(0.25 * len(world))
    assert len({r["id"] for r in recs}) == len(recs)
    first = {r["id"]: r for r in recs}
    same_image = [(first[f"{a.id}-vqa"], first[f"{a.id}-vqa-1"]) for a in world]
    assert sum(x["conversations"] != y["conversations"] for x, y in same_image) > len(world) // 2
    at = [i for i, k in enumerate(kinds) if k == "detail"]
    assert at != list(range(at[0], at[0] + len(at)))  # shuffled, not in blocks by kind
    assert recs == generate_mix(world, {"vqa": 2, "detail": 0.25}, seed=1)
    with pytest.raises(RulesError, match="must be >= 0"):
        generate_mix(world, {"vqa": -1})
    with pytest.raises(RulesError, match="makes no records"):
        generate_mix(world, {"vqa": 0})


def test_rules_need_attributes():
    ann = ImageAnnotation("coco-1", "1.jpg", 10, 10, ["a dog"], [Box("dog", (0, 0, 5, 5))])
    with pytest.raises(RulesError, match="image 'coco-1'.*lacks attributes"):
        generate_records([ann])
    with pytest.raises(RulesError, match="unknown instruction kinds"):
        generate_records([], kinds=["poetry"])
    with pytest.raises(RulesError, match="no instruction kind given"):
        generate_records([ann], kinds=[])


def test_referring_answers_name_the_object_then_the_attribute(world):
    recs = generate_records(world, kinds=["referring"], seed=0)
    by_id = {a.id: a for a in world}
    seen = set()
    for r in recs:
        parse_record(r)
        ann = by_id[r["id"].rsplit("-", 1)[0]]
        objs = objects(ann)
        conv = r["conversations"]
        assert conv[0]["value"].count("<image>") == 1 and 1 <= len(conv) // 2 <= 6
        for h, g in zip(conv[::2], conv[1::2]):
            q, a = h["value"].replace("<image>", "").strip(), g["value"]
            if m := re.match(r"(?:Name the|Which) (\w+) (?:and its color|is it, by color)", q):
                (c,) = [c for (c, s) in objs if s == m.group(1)]  # the shape names one object
                assert a == f"{m.group(1)} {c}"
                seen.add("color")
            elif m := re.match(r"(?:Name the|Which) (\w+) (?:object and its shape|shape is it)", q):
                (s,) = [s for (c, s) in objs if c == m.group(1)]
                assert a == f"{m.group(1)} {s}"
                seen.add("shape")
            elif m := re.match(r"Name the (\w+) (\w+) and its (size|place)\.", q):
                b = objs[(m.group(1), m.group(2))]
                rest = a.removeprefix(f"{m.group(1)} {m.group(2)} ")
                if m.group(3) == "size":
                    assert rest == b.attributes["size"]
                else:
                    x, y = b.center[0] / ann.width, b.center[1] / ann.height
                    words = set(rest.split())
                    assert ("left" in words) == (x < 0.4) and ("right" in words) == (x > 0.6)
                    assert ("top" in words) == (y < 0.4) and ("bottom" in words) == (y > 0.6)
                seen.add(m.group(3))
            else:
                pytest.fail(f"unknown referring question {q!r}")
    assert seen == {"color", "shape", "size", "place"}


def test_cli_rules_backend_writes_referring_records(tmp_path, capsys, world):
    from vistune.cli import main
    from vistune.instruct.annotations import save_annotations

    ann_path, out = tmp_path / "ann.json", tmp_path / "out.jsonl"
    save_annotations(world[:5], ann_path)
    base = ["data", "instruct", "--annotations", str(ann_path), "--out", str(out)]
    assert main([*base, "--backend", "rules", "--kinds", "referring,detail"]) == 0
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert kinds == ["referring", "detail"] * 5
    assert main([*base, "--backend", "rules", "--kinds", "poetry"]) == 2
    assert "unknown instruction kinds ['poetry']" in capsys.readouterr().err
    assert main([*base, "--backend", "rules", "--kinds", ","]) == 2
    assert "no instruction kind given" in capsys.readouterr().err
    # An LLM is prompted for LLaVA's three kinds only.
    assert main([*base, "--backend", "openai", "--model", "m", "--kinds", "referring"]) == 2
    assert "unknown kind(s) 'referring'" in capsys.readouterr().err
