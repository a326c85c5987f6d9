import json

import yaml

from train_fixtures import tiny_config, tiny_data  # noqa: F401
from vistune.cli import main


def test_train_command(tiny_data, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run", stage=1).to_dict()))
    assert main(["train", str(cfg_file), "train.lr=5e-4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 5e-4
    assert main(["train", str(cfg_file), "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert main(["train", str(cfg_file), "train.max_steps=2", "train.save_every=1"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and str(tmp_path / "run" / "model") in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_steps"] == 2
    assert main(["train", str(cfg_file), "train.max_steps=3", "train.save_every=1", "--resume"]) == 1
    assert "data plan changed" in capsys.readouterr().err  # total steps differ from the checkpoint's
    assert main(["merge-lora", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 1
    assert "plain model directory" in capsys.readouterr().err


def test_make_tiny_data_and_cache_features_commands(tmp_path, capsys):
    assert main(["make-tiny-data", str(tmp_path / "d"), "--images", "8"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "d" / "pretrain.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and (tmp_path / "d" / "images" / rows[0]["image"]).exists()
    capsys.readouterr()
    data = {"tokenizer": tmp_path / "d" / "tokenizer", "images": tmp_path / "d" / "images",
            "pretrain": tmp_path / "d" / "pretrain.jsonl", "instruct": tmp_path / "d" / "instruct.jsonl"}
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "run", {"data.feature_cache": "auto",
                                                                             "train.progress": False},
                                                   stage=1).to_dict()))
    assert main(["cache-features", str(cfg_file)]) == 0
    assert "8 records, 8 images" in capsys.readouterr().out
    assert main(["cache-features", str(cfg_file)]) == 0
    assert "(reused)" in capsys.readouterr().out
    # training with the same config reads that cache rather than rebuilding it
    shard = next((tmp_path / "run" / "feature_cache").glob("*.safetensors"))
    before = shard.stat().st_mtime_ns
    assert main(["train", str(cfg_file), "train.max_steps=1"]) == 0
    assert shard.stat().st_mtime_ns == before
