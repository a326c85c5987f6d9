import json
import shutil

import pytest
import torch
import yaml

import vistune

from train_fixtures import base_model_dir, tiny_config, tiny_data  # noqa: F401
from vistune.cli import main
from vistune.model.adapters import is_adapter_dir
from vistune.model.checkpoint import load_model
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered


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
    assert "train.max_steps: 2 there, 3 now" in capsys.readouterr().err  # the schedule would differ
    assert main(["merge-lora", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 1
    assert "plain model directory" in capsys.readouterr().err


def test_config_errors_are_one_line_before_anything_loads(tiny_data, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run").to_dict()))
    assert main(["train", str(cfg_file), "data.template=vicuna", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.template: unknown template 'vicuna'") and err.count("\n") == 1
    for key, value in (("model.tokenizer", tmp_path / "no-tokenizer"), ("data.train", tmp_path / "no.jsonl")):
        assert main(["train", str(cfg_file), f"{key}={value}"]) == 1
        assert capsys.readouterr().err == f"error: {key}: {'folder' if key == 'model.tokenizer' else 'file'} " \
                                          f"not found: {value}\n"
    stage2 = {**tiny_config(tiny_data, tmp_path / "run").to_dict(), "model": {"from": str(tmp_path / "stage1")}}
    cfg_file.write_text(yaml.safe_dump(stage2))
    assert main(["train", str(cfg_file)]) == 1
    assert capsys.readouterr().err == f"error: model.from: folder not found: {tmp_path / 'stage1'}\n"
    assert not (tmp_path / "run").exists()  # refused before the output folder was made


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


def test_train_resume_and_merge_lora_commands_succeed(tiny_data, base_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_data, run_dir, {"model": {"from": str(base_model_dir)}, "train.llm": "lora", "lora.r": 4,
                                           "lora.alpha": 8, "lora.dropout": 0.0, "train.lr": 1e-2,
                                           "train.max_steps": 3, "train.save_every": 1, "train.keep_last": 3})
    cfg_file = tmp_path / "lora.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(cfg_file)]) == 0
    straight = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()

    # As if the process died after step 2: resume from the newest checkpoint left, and step 3 repeats.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000003")
    shutil.rmtree(run_dir / "model")
    assert main(["train", str(cfg_file), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and f"model: {run_dir / 'model'}" in out
    resumed = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[-1]["loss"] == pytest.approx(straight[-1], rel=1e-5)
    assert is_adapter_dir(run_dir / "model")

    assert main(["merge-lora", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert f"merged model: {tmp_path / 'merged'}" in capsys.readouterr().out
    assert not is_adapter_dir(tmp_path / "merged")
    merged, tok = load_model(tmp_path / "merged")
    base, _ = load_model(base_model_dir)
    ids = torch.tensor([[tok.bos_token_id or 1, 5, 6, 7, 8]])
    with torch.no_grad():
        m, b, a = merged(ids).logits, base(ids).logits, vistune.load(run_dir / "model").model(ids).logits
    assert (m - b).abs().max() > 1e-3  # the adapters were folded in
    assert_reordered(m, a, TINY_TERMS, TINY_FORWARD)  # as the run loads: folded adapters, other order
