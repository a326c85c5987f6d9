import random

import numpy as np
from PIL import Image

from vistune.instruct.annotations import Box, load_annotations
from vistune.instruct.synth import COLORS, WorldConfig, make_world, phrase, phrasings


def test_world_images_match_annotations(tmp_path):
    anns = make_world(tmp_path, 30, seed=3)
    assert load_annotations(tmp_path / "annotations.json") == anns
    counts = set()
    for a in anns:
        img = np.asarray(Image.open(tmp_path / a.file))
        assert img.shape == (64, 64, 3) and 64 <= a.width <= 128
        assert len(a.captions) >= 3 and len(set(a.captions)) == len(a.captions)
        pairs = {(b.attributes["color"], b.attributes["shape"]) for b in a.boxes}
        assert len(pairs) == len(a.boxes)  # distinct objects: references are unambiguous
        counts.add(len(a.boxes))
        for b in a.boxes:
            x1, y1, x2, y2 = map(int, b.bbox)
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            # The box centre shows the object's colour (allowing for a small overlap
            # by a later object).
            patch = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).astype(int)
            want = np.array(COLORS[b.attributes["color"]])
            assert (np.abs(patch - want).sum(1) < 40).any() or len(a.boxes) > 1
            assert b.attributes["size"] in ("small", "large")
    assert {1, 2, 3} <= counts


def test_world_is_deterministic(tmp_path):
    a = make_world(tmp_path / "a", 5, seed=7)
    b = make_world(tmp_path / "b", 5, seed=7)
    c = make_world(tmp_path / "c", 5, seed=8)
    assert a == b and a != c
    assert (tmp_path / "a" / a[0].file).read_bytes() == (tmp_path / "b" / b[0].file).read_bytes()


def test_world_config_sizes(tmp_path):
    anns = make_world(tmp_path, 4, seed=1, cfg=WorldConfig(image_size=96, max_objects=2))
    assert all(a.width == 96 and len(a.boxes) <= 2 for a in anns)


def test_phrase_names_the_colour_before_or_after_the_shape():
    b = Box("circle", (1.0, 1.0, 9.0, 9.0), {"color": "red", "shape": "circle", "size": "small"})
    rng = random.Random(0)
    seen = {phrase(b, rng) for _ in range(60)}
    assert seen == {"red circle", "circle in red", "circle colored red"}
    assert phrase(b, random.Random(1), with_size=True).startswith("small ")


def test_captions_name_every_object_in_both_orders(tmp_path):
    # Captions that only ever said "red circle" taught the demo's LM to find an object by its
    # colour but not by its shape (docs/demo.md): both orders must occur.
    anns = make_world(tmp_path, 40, seed=5)
    colour_first = shape_first = 0
    for a in anns:
        for cap in a.captions:
            for b in a.boxes:
                first, *after = phrasings(b)  # "red circle", then the shape-first forms
                assert any(f in cap for f in (first, *after)), (cap, first)
                colour_first += first in cap
                shape_first += any(f in cap for f in after)
    assert colour_first > 50 and shape_first > 50


def test_cli_synth_writes_the_demo_world(tmp_path, capsys):
    from vistune.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--images", "6", "--seed", "7"]) == 0
    ref = make_world(tmp_path / "lib", 6, seed=7)  # what `vistune demo` draws for the same seed
    got = load_annotations(tmp_path / "cli" / "annotations.json")
    assert got == ref
    assert all((tmp_path / "cli" / a.file).read_bytes() == (tmp_path / "lib" / a.file).read_bytes() for a in ref)
    out = capsys.readouterr().out
    assert f"6 scenes, {sum(len(a.boxes) for a in ref)} objects" in out and "--backend rules" in out


def test_cli_synth_scales_the_objects_with_the_image(tmp_path):
    from vistune.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--images", "20", "--seed", "1", "--size", "128",
                 "--max-objects", "2"]) == 0
    anns = load_annotations(tmp_path / "annotations.json")
    assert all(a.width == a.height == 128 and 1 <= len(a.boxes) <= 2 for a in anns)
    assert Image.open(tmp_path / anns[0].file).size == (128, 128)
    sides = {b.attributes["size"]: set() for a in anns for b in a.boxes}
    for a in anns:
        for b in a.boxes:
            sides[b.attributes["size"]].add(b.bbox[2] - b.bbox[0])
    # 12-15 px and 20-25 px at 64 px: twice that at 128.
    assert all(24 <= s <= 30 for s in sides.get("small", ())) and all(40 <= s <= 50 for s in sides.get("large", ()))


def test_cli_synth_names_bad_arguments_and_keeps_an_existing_world(tmp_path, capsys):
    from vistune.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--images", "0"]) == 2
    assert "--images 0" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--images", "3", "--min-objects", "3",
                 "--max-objects", "2"]) == 2
    assert "min_objects (3) <= max_objects (2)" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--images", "3", "--size", "16"]) == 2
    assert "16 px" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--images", "3"]) == 0
    before = (tmp_path / "annotations.json").read_bytes()
    assert main(["data", "synth", "--out", str(tmp_path), "--images", "2", "--seed", "9"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "annotations.json").read_bytes() == before  # nothing lost
    assert main(["data", "synth", "--out", str(tmp_path), "--images", "2", "--seed", "9", "--overwrite"]) == 0
    assert len(load_annotations(tmp_path / "annotations.json")) == 2
    assert len(list((tmp_path / "images").iterdir())) == 2  # the old world's images went with it
