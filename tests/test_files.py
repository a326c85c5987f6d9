import json
import os

import pytest

from vistune import files
from vistune.files import (JsonlAppender, atomic_directory, atomic_open, atomic_path, atomic_write_bytes,
                           atomic_write_text, remove_leftovers, replace_directory, temp_path, write_json, write_jsonl)


def test_text_bytes_json_jsonl_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.md", "héllo\n")  # parents are created
    assert (tmp_path / "a" / "t.md").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    write_json(tmp_path / "c.json", {"k": "é", "n": [1, 2]})
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"k": "é", "n": [1, 2]} and "é" in text and text.endswith("}\n")
    write_json(tmp_path / "d.json", {"n": [1, 2]}, indent=None)
    assert (tmp_path / "d.json").read_text() == '{"n": [1, 2]}\n'
    write_jsonl(tmp_path / "e.jsonl", ({"i": i} for i in range(3)))
    assert (tmp_path / "e.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.json", "d.json", "e.jsonl"]


def test_failed_write_leaves_target_unchanged_and_no_temporary(tmp_path):
    target = tmp_path / "rows.jsonl"
    write_jsonl(target, [{"good": 1}])

    def rows():
        yield {"new": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_jsonl(target, rows())
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert target.read_text() == '{"good": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_target_is_untouched_until_the_write_completes(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    with atomic_open(target) as f:
        f.write("new")
        f.flush()
        # Mid-write a reader still sees the old file; the new text is in a hidden sibling.
        assert target.read_text() == "old"
        (tmp,) = [p for p in tmp_path.iterdir() if p != target]
        assert tmp.name.startswith(".m.json.tmp-") and tmp.read_text() == "new"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_path_keeps_the_suffix_and_cleans_up(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.tmp-")
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("writer failed")
    assert target.read_bytes() == b"png"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_every_write_goes_through_its_own_temporary(tmp_path):
    names = {temp_path(tmp_path / "x") for _ in range(50)}
    assert len(names) == 50
    assert temp_path(tmp_path / "x", tag="sharded") == tmp_path / ".x.tmp-sharded"


def test_written_files_get_ordinary_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic", "x")
    with atomic_directory(tmp_path / "dir") as d:
        (d / "f").write_text("x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(plain).st_mode
    os.mkdir(tmp_path / "plain_dir")
    assert os.stat(tmp_path / "dir").st_mode == os.stat(tmp_path / "plain_dir").st_mode


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_text(tmp_path / "a.txt", "x")
    assert events[:2] == ["fsync", "replace"]


def test_directory_keeps_old_content_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "model"
    with atomic_directory(final) as d:
        (d / "weights").write_text("v1")
    assert (final / "weights").read_text() == "v1"

    with atomic_directory(final) as d:
        (d / "weights").write_text("v2")
        (d / "extra").write_text("new")
        assert (final / "weights").read_text() == "v1" and not (final / "extra").exists()
    assert (final / "weights").read_text() == "v2" and (final / "extra").read_text() == "new"

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(final) as d:
            (d / "weights").write_text("v3 half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in final.iterdir()) == ["extra", "weights"]
    assert (final / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_replace_directory_swaps_in_a_prepared_directory(tmp_path):
    final, new = tmp_path / "ckpt", tmp_path / ".ckpt.tmp-sharded"
    final.mkdir()
    (final / "old").write_text("o")
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "shard").write_text("s")
    replace_directory(new, final)
    assert [p.relative_to(final).as_posix() for p in sorted(final.rglob("*"))] == ["sub", "sub/shard"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_remove_leftovers_clears_temporaries_and_restores_a_lost_directory(tmp_path):
    (tmp_path / "keep.json").write_text("{}")
    (tmp_path / ".hidden").write_text("not ours")
    (tmp_path / ".a.json.tmp-1-ab.json").write_text("half")
    (tmp_path / ".step-1.tmp-9-cd").mkdir()
    (tmp_path / ".step-1.tmp-9-cd" / "w").write_text("half")
    (tmp_path / "step-2").mkdir()
    (tmp_path / ".step-2.old-7").mkdir()  # replaced, not yet deleted: the new one is in place
    (tmp_path / ".step-3.old-7").mkdir()  # killed between the two renames: the only copy
    (tmp_path / ".step-3.old-7" / "w").write_text("good")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".a.json.tmp-1-ab.json", ".step-1.tmp-9-cd", ".step-2.old-7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "keep.json", "step-2", "step-3"]
    assert (tmp_path / "step-3" / "w").read_text() == "good"
    assert remove_leftovers(tmp_path / "missing") == []


def test_appender_adds_whole_lines_and_syncs(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    with JsonlAppender(path) as log:
        log.append([{"i": 0}, {"i": 1}])
        assert path.read_text() == '{"i": 0}\n{"i": 1}\n'  # on disk before close
        log.append(iter([{"t": "é"}]))
    assert path.read_text(encoding="utf-8") == '{"i": 0}\n{"i": 1}\n{"t": "é"}\n'
    assert len(synced) == 2
    with JsonlAppender(path, sync=False) as log:
        log.append([{"i": 2}])
        assert path.read_text(encoding="utf-8").endswith('{"i": 2}\n')
    assert len(synced) == 2

