"""The LLaVA data format: records of ``id``, ``image`` and ``conversations``.

A file is either a JSON list of records (the original LLaVA releases) or JSONL (one
record per line, which vistune prefers because it streams and appends). Every
problem is reported with the record's id, its file and (for JSONL) its line.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..files import write_json, write_jsonl
from ..text.templates import ASSISTANT_ROLES, HUMAN_ROLES, IMAGE_PLACEHOLDER


class RecordError(ValueError):
    """A record breaks the LLaVA format; the message names the record and its file."""

    def __init__(self, where: str, reason: str, record_id: str | None = None):
        self.where = where
        self.reason = reason
        # what a training run's bad-record list calls it: its id, or its file and line when it has none
        self.record_id = record_id if record_id is not None else where
        super().__init__(f"{where}: {reason}")


@dataclass
class Record:
    id: str
    images: list[str]
    conversations: list[dict]
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"record {self.id!r}" + (f" ({self.source})" if self.source else "")

    def to_json(self) -> dict:
        d: dict = {"id": self.id}
        if self.images:
            d["image"] = self.images[0] if len(self.images) == 1 else list(self.images)
        d["conversations"] = self.conversations
        d.update(self.extra)
        return d

    @property
    def num_placeholders(self) -> int:
        return sum(t["value"].count(IMAGE_PLACEHOLDER) for t in self.conversations if isinstance(t.get("value"), str))


def parse_record(obj: object, source: str = "") -> Record:
    """Turn one JSON object into a Record, checking its structure (not its images)."""
    where = source or "record"
    if not isinstance(obj, dict):
        raise RecordError(where, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if rid is None:
        raise RecordError(where, "missing 'id'")
    rid = str(rid)
    where = f"record {rid!r}" + (f" ({source})" if source else "")

    def fail(reason: str) -> RecordError:
        return RecordError(where, reason, record_id=rid)

    image = obj.get("image")
    if image is None:
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = list(image)
    else:
        raise fail("'image' must be a path or a list of paths")
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise fail("'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise fail(f"turn {i} must be an object with 'from' and 'value'")
        role = turn["from"]
        expect_human = i % 2 == 0
        if role not in HUMAN_ROLES + ASSISTANT_ROLES:
            raise fail(f"turn {i}: unknown role {role!r} (expected 'human' or 'gpt')")
        if expect_human != (role in HUMAN_ROLES):
            raise fail(
                f"turn {i}: roles out of order (expected {'human' if expect_human else 'gpt'}, got {role!r})"
            )
        if not isinstance(turn["value"], str):
            raise fail(f"turn {i} ({role}): 'value' is not a string ({type(turn['value']).__name__} "
                       f"{turn['value']!r:.40})")
        if not turn["value"].strip():
            raise fail(f"turn {i} ({role}): empty turn")
        if role in ASSISTANT_ROLES and IMAGE_PLACEHOLDER in turn["value"]:
            raise fail(f"turn {i}: {IMAGE_PLACEHOLDER} placeholder in an assistant reply")
    if conv[-1]["from"] not in ASSISTANT_ROLES:
        raise fail("last turn is not an assistant reply (nothing to train on)")
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    rec = Record(rid, images, [{"from": t["from"], "value": t["value"]} for t in conv], source, extra)
    n = rec.num_placeholders
    if n != len(images):
        if images and n == 0:
            raise fail(f"has {len(images)} image(s) but no {IMAGE_PLACEHOLDER} placeholder")
        if not images:
            raise fail(f"has {n} {IMAGE_PLACEHOLDER} placeholder(s) but no image")
        raise fail(f"has {len(images)} image(s) but {n} {IMAGE_PLACEHOLDER} placeholder(s)")
    return rec


class RecordFile(Sequence[Record]):
    """A LLaVA JSON or JSONL file, read on demand.

    JSONL is indexed by byte offset, so a million-record file costs a list of ints in
    memory and each record is parsed when asked for. JSON lists are parsed once.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self._jsonl = _is_jsonl(self.path)
        if self._jsonl:
            self._offsets: list[int] = []
            self._lines: list[int] = []
            with open(self.path, "rb") as f:
                off = 0
                for n, line in enumerate(f, 1):
                    if line.strip():
                        self._offsets.append(off)
                        self._lines.append(n)
                    off += len(line)
            self._items = None
        else:
            raw = self.path.read_bytes()
            # Bytes that are not UTF-8 become lone surrogates, so that only the records holding them are bad.
            text = raw.decode("utf-8", errors="surrogateescape")
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(str(self.path), f"not valid JSON: {e}") from None
            if not isinstance(data, list):
                raise RecordError(str(self.path), "a LLaVA JSON file must hold a list of records")
            self._items = data
            self._text = text if _SURROGATE.search(text) else None

    def __len__(self) -> int:
        return len(self._offsets) if self._jsonl else len(self._items)

    def raw(self, i: int) -> tuple[object, str]:
        if self._jsonl:
            with open(self.path, "rb") as f:
                f.seek(self._offsets[i])
                line = f.readline()
            where = f"{self.path.name}:{self._lines[i]}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte 0x{line[e.start]:02x} at column {e.start + 1}"
                raise RecordError(where, f"not valid UTF-8 ({byte})") from None
            try:
                return json.loads(text), where
            except json.JSONDecodeError as e:
                raise RecordError(where, f"not valid JSON: {e}") from None
        obj, where = self._items[i], f"{self.path.name}[{i}]"
        if self._text is not None and _has_surrogate(obj):
            raise RecordError(where, f"not valid UTF-8 ({self._bad_line(i)})")
        return obj, where

    def _bad_line(self, i: int) -> str:
        """Where record ``i`` of a JSON list holds bytes that are not UTF-8: its first such line."""
        dec = json.JSONDecoder()
        text, pos = self._text, self._text.index("[") + 1
        for _ in range(i + 1):
            pos = _skip(text, pos)
            start = pos
            _, pos = dec.raw_decode(text, pos)
            pos = _skip(text, pos)
        bad = _SURROGATE.search(text, start, pos)
        line = text.count("\n", 0, bad.start() if bad else start) + 1
        return f"line {line}"

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        obj, where = self.raw(i)
        return parse_record(obj, where)

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]


_SURROGATE = re.compile("[\udc80-\udcff]")


def _has_surrogate(obj: object) -> bool:
    if isinstance(obj, str):
        return _SURROGATE.search(obj) is not None
    if isinstance(obj, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogate(v) for v in obj)
    return False


def _skip(text: str, pos: int) -> int:
    """Past the whitespace and comma between the items of a JSON list."""
    while pos < len(text) and text[pos] in " \t\r\n,":
        pos += 1
    return pos


def _is_jsonl(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return True
    if path.suffix == ".json":
        return False
    with open(path, "rb") as f:  # bytes: a first line that is not UTF-8 is one bad record, not the file's end
        head = f.read(1024).lstrip()
    return not head.startswith(b"[")


def load_records(path: str | os.PathLike) -> list[Record]:
    return list(RecordFile(path))


def write_records(records: Sequence[Record | dict], path: str | os.PathLike) -> None:
    """Write records as JSONL (``.jsonl``) or a JSON list (anything else), atomically."""
    objs = [r.to_json() if isinstance(r, Record) else r for r in records]
    if Path(path).suffix == ".jsonl":
        write_jsonl(path, objs)
    else:
        write_json(path, objs, indent=1)
