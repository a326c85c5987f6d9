"""MiniGPT-4's presets: the paper's settings, and the tiny pair trained through both stages."""
from __future__ import annotations

import json

from train_fixtures import tiny_data  # noqa: F401
from vistune.model.checkpoint import load_model
from vistune.train import run
from vistune.train.config import load_run_config


def test_minigpt4_presets_keep_the_papers_settings():
    s1, s2 = load_run_config("minigpt4-stage1"), load_run_config("minigpt4-stage2")
    for cfg in (s1, s2):  # only MiniGPT-4's linear layer learns, in both stages
        t = cfg.train
        assert (t.vision, t.connector, t.projector, t.llm) == ("frozen", "frozen", "full", "frozen")
        assert t.weight_decay == 0.05 and t.scheduler == "cosine"
    assert s1.model.connector == "qformer" and s1.model.connector_from == s1.model.vision
    assert (s1.model.num_queries, s1.model.projector, s1.data.template) == (32, "linear", "plain")
    assert (s1.model.vision_feature_layer, s1.model.vision_feature_select) == (-1, "cls_patch")
    assert s1.train.batch_size * 4 == 256 and s1.train.max_steps == 20000 and s1.train.lr == 1e-4
    assert s1.train.warmup_ratio * s1.train.max_steps == 5000
    assert s2.model.from_ == "runs/minigpt4-stage1/model" and s2.data.template == "minigpt4"
    assert (s2.train.batch_size, s2.train.max_steps, s2.train.lr) == (12, 1000, 3e-5)
    assert s2.train.warmup_ratio * s2.train.max_steps == 200


def test_the_tiny_minigpt4_pair_trains_through_both_stages(tiny_data, tmp_path):
    d = tiny_data
    common = [f"data.images={d['images']}", "train.max_steps=2", "train.progress=false"]
    s1 = load_run_config("minigpt4-tiny-stage1", common + [
        f"output_dir={tmp_path / 's1'}", f"model.tokenizer={d['tokenizer']}", f"data.train={d['pretrain']}"])
    r1 = run(s1)
    cfg = json.loads((r1.model_dir / "config.json").read_text())
    assert cfg["connector"]["type"] == "qformer" and cfg["num_image_tokens"] == 8
    s2 = load_run_config("minigpt4-tiny-stage2", common + [
        f"output_dir={tmp_path / 's2'}", f"model.from={r1.model_dir}", f"data.train={d['instruct']}"])
    r2 = run(s2)
    before, _ = load_model(r1.model_dir)
    after, _ = load_model(r2.model_dir)
    a, b = before.state_dict(), after.state_dict()
    changed = {k.split(".")[0] for k in a if not (a[k] == b[k]).all()}
    assert changed == {"projector"}  # stage 2 trains the linear layer alone
    assert after.config.template == "minigpt4"
