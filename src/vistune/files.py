"""Writing files so that a crash never leaves a half-written one where a good one was.

Every writer here works on a temporary sibling (same directory, so the final
``os.replace`` is a rename within one file system, which POSIX makes atomic), fsyncs
it, and renames it into place only once it is complete. Readers see the old file or
the new one, never a mix; a write that raises removes its temporary and leaves the
target as it was. Directories work the same way (`atomic_directory`).

Temporaries are hidden siblings named ``.<name>.tmp-<tag><suffix>``: the suffix is
kept because some writers (matplotlib's ``savefig``) pick the format from it.
`remove_leftovers` clears what a killed process left behind.

Append-only logs (`JsonlAppender`) are the one thing not written atomically: they
grow line by line, and their readers drop a torn last line.

This module imports nothing from vistune, so every layer may use it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

_TMP = ".tmp-"
_OLD = ".old-"


def temp_path(final: str | os.PathLike, tag: str | None = None, suffix: str = "") -> Path:
    """The hidden sibling a write of ``final`` goes to first. Without ``tag`` the name is
    unique to this call; a fixed ``tag`` lets several processes agree on one name."""
    final = Path(final)
    tag = tag if tag is not None else f"{os.getpid()}-{secrets.token_hex(4)}"
    return final.with_name(f".{final.name}{_TMP}{tag}{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through (for writers that take a path:
    ``savefig``, ``safetensors.save_file``, ``torch.save``); it replaces ``path`` when
    the block ends without an exception and is deleted when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix=path.suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """``open(path, mode)`` (a write mode), but the file appears at ``path`` only complete."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON (atomically). ``indent=None`` writes one line, for
    machine-only files such as long RNG states."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write one JSON value per line (atomically)."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


class JsonlAppender:
    """Appends JSON lines to a file that grows over a long job (predictions, metrics,
    caches). Each `append` writes its rows in one piece and flushes them; with ``sync``
    it also fsyncs, so a crash loses at most the rows being written (a torn last line,
    which readers drop)."""

    def __init__(self, path: str | os.PathLike, *, sync: bool = True):
        self.path = Path(path)
        self.sync = sync
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, rows: Iterable[Any]) -> None:
        self._f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._f.flush()
        if self.sync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` (files fsynced, old one
    removed) when the block ends without an exception and is deleted when it raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, final)


def replace_directory(src: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the complete directory ``src`` to ``final``, replacing what is there.

    A directory cannot be renamed over a non-empty one, so the old ``final`` is first
    moved aside (to a hidden ``.old-`` sibling that `remove_leftovers` restores if we die
    before the new one is in place) and deleted after."""
    src, final = Path(src), Path(final)
    for root, _, names in os.walk(src):
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}{_OLD}{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(src, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Clear the temporaries that a process killed while writing left in ``directory``;
    returns what was removed. An old directory whose replacement never arrived is put
    back in place instead. Run it only when no other process is writing there."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        if not p.name.startswith("."):
            continue
        if _OLD in p.name:
            final = directory / p.name[1:p.name.rindex(_OLD)]
            if not final.exists():
                os.replace(p, final)
                continue
        elif _TMP not in p.name:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file's data (through any descriptor: whoever wrote it), or make the renames
    in a directory survive a power cut. POSIX only: Windows opens no directories."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
