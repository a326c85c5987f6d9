"""COCO's own captions_*.json / instances_*.json, in COCO's exact schema, -> ImageAnnotation."""
import copy
import json

import pytest

from vistune.instruct.annotations import AnnotationError, Box, ImageAnnotation, save_annotations, symbolic_context
from vistune.instruct.coco import load_any_annotations, load_coco

INFO = {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2017,
        "contributor": "COCO Consortium", "date_created": "2017/09/01"}
LICENSES = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
             "name": "Attribution-NonCommercial-ShareAlike License"}]
IMAGES = [
    {"license": 1, "file_name": "000000397133.jpg", "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg",
     "height": 427, "width": 640, "date_captured": "2013-11-14 17:02:52",
     "flickr_url": "http://farm7.staticflickr.com/6116/6255196340_da26cf2c9e_z.jpg", "id": 397133},
    {"license": 1, "file_name": "000000037777.jpg", "coco_url": "http://images.cocodataset.org/val2017/000000037777.jpg",
     "height": 230, "width": 352, "date_captured": "2013-11-14 20:55:31",
     "flickr_url": "http://farm9.staticflickr.com/8429/7839199426_f6d48aa585_z.jpg", "id": 37777},
]
CAPTIONS = {"info": INFO, "licenses": LICENSES, "images": IMAGES, "annotations": [
    {"image_id": 397133, "id": 370509, "caption": "A man is in a kitchen making pizzas."},
    {"image_id": 37777, "id": 397026, "caption": "The dining table near the kitchen has a bowl of fruit on it."},
    {"image_id": 397133, "id": 375992, "caption": "Man in apron standing on front of oven with pans and bakeware \n"},
    {"image_id": 37777, "id": 399065, "caption": "A small kitchen has various appliances and a table."},
]}
INSTANCES = {"info": INFO, "licenses": LICENSES, "images": IMAGES, "annotations": [
    {"segmentation": [[224.24, 297.18, 228.29, 297.18, 234.91, 298.29]], "area": 4110.88, "iscrowd": 0,
     "image_id": 397133, "bbox": [217.62, 240.54, 38.99, 57.75], "category_id": 44, "id": 82445},
    {"segmentation": [[382.48, 268.63, 330.24, 181.04, 338.26, 163.3]], "area": 43481.0, "iscrowd": 0,
     "image_id": 397133, "bbox": [388.66, 69.92, 109.41, 277.62], "category_id": 1, "id": 200887},
    {"segmentation": {"counts": [272, 2, 4, 4], "size": [230, 352]}, "area": 2510.0, "iscrowd": 1,
     "image_id": 37777, "bbox": [0.0, 120.0, 60.0, 40.0], "category_id": 1, "id": 900100000000},
    {"segmentation": [[100.0, 50.0, 120.0, 60.0, 110.0, 70.0]], "area": 300.5, "iscrowd": 0,
     "image_id": 37777, "bbox": [100.0, 50.0, 20.0, 20.0], "category_id": 52, "id": 1042},
], "categories": [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "kitchen", "id": 44, "name": "bottle"},
    {"supercategory": "food", "id": 52, "name": "banana"},
]}


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_join_captions_and_instances(tmp_path):
    caps = write(tmp_path, "captions_val2017.json", CAPTIONS)
    inst = write(tmp_path, "instances_val2017.json", INSTANCES)
    anns = load_coco(caps, inst)
    assert [a.id for a in anns] == ["37777", "397133"]  # sorted by image id
    a = anns[1]
    assert (a.file, a.width, a.height) == ("000000397133.jpg", 640, 427)
    assert a.captions == ["A man is in a kitchen making pizzas.",
                          "Man in apron standing on front of oven with pans and bakeware"]  # stray whitespace gone
    assert [b.category for b in a.boxes] == ["bottle", "person"]
    assert a.boxes[0].bbox == pytest.approx((217.62, 240.54, 217.62 + 38.99, 240.54 + 57.75))
    assert symbolic_context(a).splitlines()[-1] == "person: [0.607, 0.164, 0.778, 0.814]"
    b = anns[0]
    assert [x.category for x in b.boxes] == ["person", "banana"]  # crowd boxes kept by default
    assert [x.category for x in load_coco(caps, inst, include_crowd=False)[0].boxes] == ["banana"]
    # Either file alone.
    assert [a.boxes for a in load_coco(caps)] == [[], []]
    assert [a.captions for a in load_coco(instances=inst)] == [[], []]


def test_load_any_detects_formats(tmp_path):
    caps = write(tmp_path, "c.json", CAPTIONS)  # names do not matter: content does
    inst = write(tmp_path, "i.json", INSTANCES)
    joined = load_coco(caps, inst)
    assert load_any_annotations(f"{inst},{caps}") == joined
    assert load_any_annotations([str(caps), inst]) == joined
    own = tmp_path / "own.json"
    save_annotations([ImageAnnotation("x1", "x1.png", 10, 10, ["A dot."], [Box("dot", (1, 1, 2, 2))])], own)
    mixed = load_any_annotations([f"{caps},{inst}", str(own)])
    assert [a.id for a in mixed] == ["x1", "37777", "397133"]
    with pytest.raises(AnnotationError, match="second COCO captions file"):
        load_any_annotations([caps, caps])
    with pytest.raises(AnnotationError, match="image id 'x1' appears more than once"):
        load_any_annotations([own, own])
    other = write(tmp_path, "other.json", {"foo": 1})
    with pytest.raises(AnnotationError, match="other.json: neither vistune annotations JSON nor a COCO"):
        load_any_annotations(other)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_any_annotations(f"{caps},{tmp_path / 'missing.json'}")


@pytest.mark.parametrize("mutate, file, match", [
    (lambda c, i: c["annotations"].append({"image_id": 5, "id": 1, "caption": "x"}),
     "captions", r"captions.json: annotations\[4\] refers to image 5, which is not in 'images'"),
    (lambda c, i: i["annotations"][3].update(category_id=99),
     "instances", r"instances.json: annotations\[3\] \(image 37777\): unknown category_id 99"),
    (lambda c, i: i["annotations"][0].update(bbox=[1, 2, 3]),
     "instances", r"annotations\[0\] \(image 397133\): 'bbox' must be \[x, y, width, height\]"),
    (lambda c, i: i["annotations"][1].update(bbox=[1, 2, -3, 4]),
     "instances", r"annotations\[1\] \(image 397133\): negative box size"),
    (lambda c, i: c["images"][1].pop("height"),
     "captions", r"captions.json: image 37777: missing field 'height'"),
    (lambda c, i: i["images"][0].update(width=641),
     "instances", r"instances.json: image 397133: conflicts with another file"),
    (lambda c, i: c["annotations"][0].update(caption=None),
     "captions", r"annotations\[0\] \(image 397133\): 'caption' must be a string"),
])
def test_errors_name_file_and_image(tmp_path, mutate, file, match):
    c, i = copy.deepcopy(CAPTIONS), copy.deepcopy(INSTANCES)
    mutate(c, i)
    caps = write(tmp_path, "captions.json", c)
    inst = write(tmp_path, "instances.json", i)
    with pytest.raises(AnnotationError, match=match):
        load_coco(caps, inst)


def test_wrong_file_for_role(tmp_path):
    caps = write(tmp_path, "captions.json", CAPTIONS)
    with pytest.raises(AnnotationError, match="captions.json: not a COCO instances file"):
        load_coco(instances=caps)
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="broken.json: not valid JSON"):
        load_coco(bad)
