import json

import pytest

from vistune.instruct.annotations import (
    AnnotationError, Box, ImageAnnotation, load_annotations, save_annotations, symbolic_context,
)


def test_roundtrip_and_context(tmp_path):
    ann = ImageAnnotation("1", "1.png", 200, 100, ["A bike.", "A red bike."],
                          [Box("bicycle", (57.4, 64.1, 101.4, 87.4), {"color": "red"})])
    save_annotations([ann], tmp_path / "a.json")
    back = load_annotations(tmp_path / "a.json")
    assert back == [ann]
    assert symbolic_context(ann) == "A bike.\nA red bike.\n\nbicycle: [0.287, 0.641, 0.507, 0.874]"
    assert symbolic_context(ann, with_boxes=False) == "A bike.\nA red bike."


def test_errors_name_image(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"images": [{"id": "7", "file": "x.png", "width": 10}]}))
    with pytest.raises(AnnotationError, match="image '7': missing field 'height'"):
        load_annotations(p)
    p.write_text(json.dumps({"images": [{"id": "8", "file": "x", "width": 1, "height": 1,
                                         "boxes": [{"category": "a", "bbox": [1, 2]}]}]}))
    with pytest.raises(AnnotationError, match="image '8': box 0"):
        load_annotations(p)
    p.write_text("[]")
    with pytest.raises(AnnotationError, match="'images' list"):
        load_annotations(p)
