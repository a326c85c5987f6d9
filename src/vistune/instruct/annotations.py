"""Captions and boxes: the symbolic view of an image that the data engine reads.

vistune's annotations JSON (version 1)::

    {"version": 1,
     "images": [{"id": "000001", "file": "000001.png", "width": 96, "height": 96,
                 "captions": ["A red circle above a blue square.", ...],
                 "boxes": [{"category": "circle", "bbox": [x1, y1, x2, y2],
                            "attributes": {"color": "red", "size": "small"}}]}]}

``bbox`` is in pixels; ``attributes`` is optional (the synthetic world fills it,
COCO has none). COCO's own files are read by `coco.py` into the same classes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_json

ANNOTATIONS_VERSION = 1


class AnnotationError(ValueError):
    """A malformed annotations file; the message names the image and the field."""


@dataclass
class Box:
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    attributes: dict = field(default_factory=dict)

    def normalized(self, width: int, height: int) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.bbox
        return (x1 / width, y1 / height, x2 / width, y2 / height)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.bbox
        return ((x1 + x2) / 2, (y1 + y2) / 2)


@dataclass
class ImageAnnotation:
    id: str
    file: str
    width: int
    height: int
    captions: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["boxes"] = [{"category": b.category, "bbox": list(b.bbox), **({"attributes": b.attributes} if b.attributes else {})}
                      for b in self.boxes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageAnnotation":
        where = f"image {d.get('id', d.get('file', '?'))!r}"
        try:
            boxes = []
            for k, b in enumerate(d.get("boxes", [])):
                bbox = tuple(float(x) for x in b["bbox"])
                if len(bbox) != 4:
                    raise AnnotationError(f"{where}: box {k} bbox must have 4 numbers [x1, y1, x2, y2]")
                boxes.append(Box(str(b["category"]), bbox, dict(b.get("attributes") or {})))
            return cls(
                id=str(d["id"]), file=str(d["file"]), width=int(d["width"]), height=int(d["height"]),
                captions=[str(c) for c in d.get("captions", [])], boxes=boxes,
            )
        except KeyError as e:
            raise AnnotationError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, AnnotationError):
                raise
            raise AnnotationError(f"{where}: {e}") from None


def symbolic_context(ann: ImageAnnotation, with_boxes: bool = True) -> str:
    """What the text-only LLM sees: captions, a blank line, then `category: [x1, y1, x2, y2]`
    per box, normalised to [0, 1] with 3 decimals."""
    lines = list(ann.captions)
    if with_boxes and ann.boxes:
        lines.append("")
        for b in ann.boxes:
            coords = ", ".join(f"{v:.3f}" for v in b.normalized(ann.width, ann.height))
            lines.append(f"{b.category}: [{coords}]")
    return "\n".join(lines)


def load_annotations(path: str | os.PathLike) -> list[ImageAnnotation]:
    """Read vistune's annotations JSON."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotations file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: expected an object with an 'images' list (vistune annotations JSON)")
    if data.get("version", ANNOTATIONS_VERSION) > ANNOTATIONS_VERSION:
        raise AnnotationError(f"{path}: annotations version {data['version']} is newer than this vistune reads")
    return [ImageAnnotation.from_dict(d) for d in data["images"]]


def save_annotations(anns: list[ImageAnnotation], path: str | os.PathLike) -> None:
    write_json(path, {"version": ANNOTATIONS_VERSION, "images": [a.to_dict() for a in anns]}, indent=1)
