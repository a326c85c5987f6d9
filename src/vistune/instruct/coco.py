"""COCO's own annotation files -> `ImageAnnotation`s, and one loader for any input.

COCO ships captions and boxes in two files per split, as users download them:

- ``captions_<split>.json``: ``images`` and ``annotations`` of ``{"image_id", "caption"}``;
- ``instances_<split>.json``: ``images``, ``annotations`` of ``{"image_id", "category_id",
  "bbox": [x, y, w, h]}`` (pixels, top-left origin) and ``categories`` of ``{"id", "name"}``.

They are joined by image id into vistune's form: captions in file order, boxes as
``[x1, y1, x2, y2]`` pixels with the category's name. Which file is which is read from
the content (``categories`` / ``caption`` keys), not the file name, so renamed files work.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from .annotations import AnnotationError, Box, ImageAnnotation, load_annotations

PathLike = str | os.PathLike


def _read_json(path: Path) -> object:
    if not path.exists():
        raise FileNotFoundError(f"annotations file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from None


def coco_kind(data: object) -> str | None:
    """'captions', 'instances' or None (not a COCO annotations file)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return None
    if not isinstance(data.get("annotations"), list):
        return None
    if "categories" in data:
        return "instances"
    anns = data["annotations"]
    if not anns or (isinstance(anns[0], dict) and "caption" in anns[0]):
        return "captions"
    return None


def _image_table(data: dict, path: Path, table: dict[int, dict]) -> None:
    """Add the file's ``images`` to `table` (id -> {file, width, height}); the two files
    must agree about an image they both list."""
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise AnnotationError(f"{path}: images[{k}] has no 'id'")
        iid = im["id"]
        where = f"{path}: image {iid}"
        try:
            entry = {"file": str(im["file_name"]), "width": int(im["width"]), "height": int(im["height"])}
        except KeyError as e:
            raise AnnotationError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{where}: bad width/height: {e}") from None
        if entry["width"] <= 0 or entry["height"] <= 0:
            raise AnnotationError(f"{where}: width and height must be positive, got {entry['width']}x{entry['height']}")
        old = table.get(iid)
        if old is not None and old != entry:
            raise AnnotationError(f"{where}: conflicts with another file's entry for this image ({old} vs {entry})")
        table[iid] = entry


def _check_image(iid: object, images: dict, path: Path, k: int) -> None:
    if iid not in images:
        raise AnnotationError(f"{path}: annotations[{k}] refers to image {iid}, which is not in 'images'")


def load_coco(
    captions: PathLike | None = None, instances: PathLike | None = None, *, include_crowd: bool = True
) -> list[ImageAnnotation]:
    """Join a COCO captions file and/or instances file into `ImageAnnotation`s, sorted by
    image id. Either file may be missing (captions only, or boxes only)."""
    if captions is None and instances is None:
        raise ValueError("load_coco needs a captions file, an instances file or both")
    images: dict[int, dict] = {}
    caps: dict[int, list[str]] = {}
    boxes: dict[int, list[Box]] = {}
    if captions is not None:
        path = Path(captions)
        data = _read_json(path)
        if coco_kind(data) != "captions":
            raise AnnotationError(f"{path}: not a COCO captions file (expected 'images' and 'annotations' with 'caption')")
        _image_table(data, path, images)
        for k, a in enumerate(data["annotations"]):
            iid = a.get("image_id") if isinstance(a, dict) else None
            _check_image(iid, images, path, k)
            text = a.get("caption")
            if not isinstance(text, str):
                raise AnnotationError(f"{path}: annotations[{k}] (image {iid}): 'caption' must be a string")
            # COCO captions carry stray spaces and newlines ("A man riding a wave on top of a surfboard.\n").
            text = " ".join(text.split())
            if text:
                caps.setdefault(iid, []).append(text)
    if instances is not None:
        path = Path(instances)
        data = _read_json(path)
        if coco_kind(data) != "instances":
            raise AnnotationError(f"{path}: not a COCO instances file (expected 'images', 'annotations' and 'categories')")
        _image_table(data, path, images)
        try:
            names = {c["id"]: str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError):
            raise AnnotationError(f"{path}: every entry of 'categories' needs an 'id' and a 'name'") from None
        for k, a in enumerate(data["annotations"]):
            iid = a.get("image_id") if isinstance(a, dict) else None
            _check_image(iid, images, path, k)
            where = f"{path}: annotations[{k}] (image {iid})"
            if a.get("category_id") not in names:
                raise AnnotationError(f"{where}: unknown category_id {a.get('category_id')!r}")
            if a.get("iscrowd") and not include_crowd:
                continue
            bbox = a.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise AnnotationError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                raise AnnotationError(f"{where}: 'bbox' must hold numbers, got {bbox!r}") from None
            if w < 0 or h < 0:
                raise AnnotationError(f"{where}: negative box size in {bbox!r}")
            boxes.setdefault(iid, []).append(Box(names[a["category_id"]], (x, y, x + w, y + h)))
    return [
        ImageAnnotation(str(iid), m["file"], m["width"], m["height"], caps.get(iid, []), boxes.get(iid, []))
        for iid, m in sorted(images.items(), key=lambda kv: _sort_key(kv[0]))
    ]


def _sort_key(iid: object) -> tuple:
    return (0, iid, "") if isinstance(iid, (int, float)) else (1, 0, str(iid))


def split_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """`--annotations` may be repeated and each value may be comma-separated."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        if isinstance(p, str):
            out.extend(Path(s.strip()) for s in p.split(",") if s.strip())
        else:
            out.append(Path(p))
    if not out:
        raise ValueError("no annotations file given")
    return out


def load_any_annotations(paths: PathLike | Sequence[PathLike]) -> list[ImageAnnotation]:
    """Load vistune annotations JSON and/or COCO files, telling them apart by content.

    COCO captions + instances files are joined with each other; each vistune file is
    read on its own. Image ids must be unique across everything loaded.
    """
    coco: dict[str, Path] = {}
    result: list[ImageAnnotation] = []
    for path in split_paths(paths):
        data = _read_json(path)
        kind = coco_kind(data)
        if kind is None:
            if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
                raise AnnotationError(
                    f"{path}: neither vistune annotations JSON nor a COCO captions/instances file"
                )
            result.extend(load_annotations(path))
            continue
        if kind in coco:
            raise AnnotationError(f"{path}: a second COCO {kind} file (first: {coco[kind]}); give one split at a time")
        coco[kind] = path
    if coco:
        result.extend(load_coco(coco.get("captions"), coco.get("instances")))
    seen: set[str] = set()
    for a in result:
        if a.id in seen:
            raise AnnotationError(f"image id {a.id!r} appears more than once in the annotations given")
        seen.add(a.id)
    return result
