"""Check a whole LLaVA data file at once and report every problem.

``validate_file`` checks what needs no model (the records' form, ids, images);
``validate_lengths`` encodes every record as training would for one model's tokenizer,
template and ``max_length``, and says which records training would skip and which it
would cut short.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..text.encode import EncodingError
from ..text.templates import get_template
from .images import ImageError, open_image, resolve_image_path
from .records import RecordError, RecordFile, parse_record

if TYPE_CHECKING:
    from .settings import TextSettings


@dataclass
class Problem:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def validate_file(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    template: str | None = None,
    check_images: bool = True,
) -> tuple[int, list[Problem]]:
    """Returns (number of records, problems). Images are opened and decoded."""
    problems: list[Problem] = []
    if template is not None:
        try:
            get_template(template)
        except ValueError as e:
            problems.append(Problem("template", str(e)))
    try:
        rf = RecordFile(path)
    except (RecordError, FileNotFoundError) as e:
        return 0, problems + [Problem(str(path), str(e))]
    seen: dict[str, str] = {}
    checked: dict[Path, str | None] = {}
    for i in range(len(rf)):
        try:
            obj, where = rf.raw(i)
            rec = parse_record(obj, where)
        except RecordError as e:
            problems.append(Problem(e.where, e.reason))
            continue
        if rec.id in seen:
            problems.append(Problem(rec.where, f"duplicate id (first at {seen[rec.id]})"))
        else:
            seen[rec.id] = rec.source
        if template is not None and len(rec.conversations) > 2:
            try:
                if get_template(template).single_turn:
                    problems.append(Problem(rec.where, f"template {template!r} takes one exchange, record has "
                                                       f"{len(rec.conversations)} turns"))
            except ValueError:
                pass
        if check_images:
            for name in rec.images:
                p = resolve_image_path(name, image_dir)
                if p not in checked:
                    try:
                        open_image(p)
                        checked[p] = None
                    except ImageError as e:
                        checked[p] = str(e)
                if checked[p]:
                    problems.append(Problem(rec.where, checked[p]))
    return len(rf), problems


def validate_lengths(path: str | os.PathLike, text: TextSettings,
                     image_dir: str | os.PathLike | None = None) -> tuple[list[Problem], list[Problem]]:
    """(problems, cuts): the records that training with ``text`` would skip (too long to cut
    without losing the image or every reply, or not encodable), and those it would train on
    cut to ``text.max_length``, each cut naming the tokens lost. Records that do not parse are
    left to ``validate_file``. An anyres model's image token counts come from the images' sizes
    (their headers, under ``image_dir``)."""
    problems: list[Problem] = []
    cuts: list[Problem] = []
    rf = RecordFile(path)
    for i in range(len(rf)):
        try:
            obj, where = rf.raw(i)
            rec = parse_record(obj, where)
        except RecordError:
            continue
        try:
            enc = text.encode(rec.conversations, rec.id, text.record_image_sizes(rec.images, image_dir, rec.id))
        except EncodingError as e:
            problems.append(Problem(rec.where, e.reason))
            continue
        if enc.cut:
            cuts.append(Problem(rec.where, f"{enc.cut} token(s) longer than max_length {text.max_length}: "
                                           "training would cut its end off and not train it"))
    return problems, cuts
