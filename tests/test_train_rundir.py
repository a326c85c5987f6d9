"""A run's output_dir and its data: never train the wrong thing silently, never lose a run."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import subset, tiny_config, tiny_data  # noqa: F401
from vistune.cli import main
from vistune.data.validate import validate_file
from vistune.train import ConfigError, TooManyBadRecords, run
from vistune.train.checkpoints import list_checkpoints


def _weights(model_dir: Path) -> dict:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_new_run_into_another_runs_folder_is_refused_and_overwrite_equals_a_fresh_folder(tiny_data, tmp_path):
    out = tmp_path / "a"
    old = tiny_config(tiny_data, out, {"train.max_steps": 3, "train.save_every": 1, "train.keep_last": 2}, stage=1)
    run(old)
    before = _weights(out / "model")
    new = old.with_overrides(["train.max_steps=2", "train.lr=5e-3"])
    with pytest.raises(ConfigError, match=rf"output_dir {out} holds another run \(config.yaml, model, checkpoints\)"
                                          r".*--resume.*new output_dir.*--overwrite"):
        run(new)
    assert all(torch.equal(v, _weights(out / "model")[k]) for k, v in before.items())  # left as it was

    over = run(new, overwrite=True)
    fresh = run(new.with_overrides([f"output_dir={tmp_path / 'b'}"]))
    # The old run's step-3 checkpoint would outlive the new run's pruning; overwrite removed it first.
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.output_dir.iterdir())
    a, b = _weights(over.model_dir), _weights(fresh.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert over.metrics_path.read_text().count("\n") == 2
    assert [json.loads(x)["loss"] for x in over.metrics_path.read_text().splitlines()] == \
        [json.loads(x)["loss"] for x in fresh.metrics_path.read_text().splitlines()]
    # config.yaml records the run, not how it started: it resumes as it is
    assert "overwrite: false" in (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="--overwrite removes the checkpoints that --resume continues from"):
        run(new, resume="auto", overwrite=True)


def test_resume_refuses_changed_settings_and_allows_those_that_change_nothing(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "r", {"train.max_steps": 2, "train.save_every": 1}, stage=1)
    first = run(cfg)
    with pytest.raises(ConfigError, match=r"it was trained with other settings \(data.max_length: 160 there, 128 "
                                          r"now; train.lr: 0.001 there, 0.0005 now\)"):
        run(cfg.with_overrides(["train.lr=5e-4", "data.max_length=128"]), resume="auto")
    # Logging, checkpointing and data loading do not change what is computed; resumed at the last step,
    # nothing is left to train and the summary keeps the run's losses.
    again = run(cfg.with_overrides(["train.log_every=2", "train.save_every=2", "train.keep_last=5",
                                    "train.max_bad_records=4"]), resume="auto")
    assert again.steps == 2 and again.resumed_from.name == "step-00000002"
    assert (again.first_loss, again.final_loss) == (first.first_loss, first.final_loss)
    summary = again.summary_path.read_text()
    assert "nan" not in summary and "0 tokens/s" not in summary and "no step left to train" in summary
    # With nothing to continue from, --resume says so instead of starting over the run's files
    for p in list_checkpoints(cfg.output_dir):
        __import__("shutil").rmtree(p)
    with pytest.raises(ConfigError, match=r"holds a run \(config.yaml, model\) but no checkpoint"):
        run(cfg, resume="auto")


def test_resume_refuses_a_changed_data_file(tiny_data, tmp_path):
    data = subset(tiny_data["pretrain"], tmp_path / "d.jsonl", 16)
    cfg = tiny_config(tiny_data, tmp_path / "r", {"train.max_steps": 2, "train.save_every": 1,
                                                   "data.train": str(data)}, stage=1)
    run(cfg)
    subset(tiny_data["pretrain"], data, 12)  # the same path, other records
    with pytest.raises(ConfigError, match=r"data plan changed \(num_samples: 16 -> 12"):
        run(cfg, resume="auto")


def _with_non_utf8_line(tiny_data, path: Path) -> Path:
    """Twelve good records, the seventh with a byte that is not UTF-8 in its reply (line 7)."""
    subset(tiny_data["pretrain"], path, 12)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b'"from": "gpt", "value": "', b'"from": "gpt", "value": "\xff')
    assert b"\xff" in lines[6]
    path.write_bytes(b"".join(lines))
    return path


def test_a_non_utf8_line_is_a_bad_record_named_by_line(tiny_data, tmp_path, capsys):
    data = _with_non_utf8_line(tiny_data, tmp_path / "mixed.jsonl")
    n, problems = validate_file(data, tiny_data["images"])
    column = data.read_bytes().splitlines()[6].index(b"\xff") + 1
    assert n == 12 and [str(p) for p in problems] == [f"mixed.jsonl:7: not valid UTF-8 (byte 0xff at column {column})"]
    assert main(["data", "stats", str(data), "--out", str(tmp_path / "stats")]) == 0
    assert "11 records (11 with an image), 1 invalid" in capsys.readouterr().out

    as_list = tmp_path / "mixed.json"  # a JSON list: the record holding the byte is bad, the others are read
    as_list.write_bytes(b"[\n" + b",\n".join(data.read_bytes().splitlines()) + b"\n]\n")
    n, problems = validate_file(as_list, tiny_data["images"])
    assert n == 12 and [str(p) for p in problems] == ["mixed.json[6]: not valid UTF-8 (line 8)"]

    for grouped in (False, True):
        r = run(tiny_config(tiny_data, tmp_path / f"run-{grouped}", {"data.train": str(data), "train.epochs": 2,
                                                                      "data.group_by_length": grouped,
                                                                      "train.max_bad_records": 1}, stage=1))
        assert r.steps == 6  # 12 records / 4 per step x 2 epochs: the bad one skipped, the run whole
        assert [(b["id"], b["index"]) for b in r.bad_records] == [("mixed.jsonl:7", 6)]
        assert "not valid UTF-8" in r.bad_records[0]["reason"]


def _with_bad_records(tiny_data, path: Path) -> Path:
    """Twelve good records plus a missing image and an undecodable image (bad only once opened)."""
    subset(tiny_data["pretrain"], path, 12)
    junk = path.parent / "junk.png"
    junk.write_bytes(b"not a png at all")
    with open(path, "a") as f:
        for rid, image in (("missing-img", "nope.png"), ("junk-img", str(junk))):
            f.write(json.dumps({"id": rid, "image": image, "conversations": [
                {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red."}]}) + "\n")
    return path


def test_bad_records_are_counted_once_over_epochs_and_unreadable_ones_stop_a_run_before_its_first_step(
        tiny_data, tmp_path):
    data = _with_bad_records(tiny_data, tmp_path / "bad.jsonl")
    cfg = tiny_config(tiny_data, tmp_path / "run", {"data.train": str(data), "train.epochs": 3,
                                                     "train.max_bad_records": 2}, stage=1)
    r = run(cfg)  # 2 bad records met in each of 3 epochs: 2 records, within the 2 allowed
    assert r.steps == 12 and sorted(b["id"] for b in r.bad_records) == ["junk-img", "missing-img"]
    logged = [json.loads(x)["id"] for x in (r.output_dir / "bad_records.jsonl").read_text().splitlines()]
    assert sorted(logged) == ["junk-img", "missing-img"]
    assert json.loads(r.metrics_path.read_text().splitlines()[-1])["bad_records"] == 2

    # A line that is not JSON is found before the first step: over the limit, no step is trained.
    with open(data, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "early"
    with pytest.raises(TooManyBadRecords, match=r"1 bad records of 15, over the 0 that train.max_bad_records"):
        run(cfg.with_overrides([f"output_dir={out}", "train.max_bad_records=0"]))
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()
    assert [json.loads(x)["id"] for x in (out / "bad_records.jsonl").read_text().splitlines()] == ["bad.jsonl:15"]


def test_what_an_interrupted_model_write_left_is_cleaned_by_the_next_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    left = out / ".model.tmp-4242-deadbeef"  # atomic_directory's temporary, as a kill mid-save leaves it
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"\0" * 1024)
    run(tiny_config(tiny_data, out, {"train.max_steps": 1}, stage=1))
    assert not left.exists() and (out / "model").is_dir()
