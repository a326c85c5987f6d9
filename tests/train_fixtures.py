"""Shared pieces of the training tests: tiny data on disk and tiny run configs."""
from __future__ import annotations

import pytest

from vistune.model.tiny import tiny_text_config, tiny_vision_config
from vistune.train.config import RunConfig, apply_overrides
from vistune.instruct.tiny_data import make_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"), n_images=24, seed=0)


def tiny_config(data: dict, out, overrides: dict | None = None, *, stage: int = 2, text: str = "llama") -> RunConfig:
    """A run of a from-scratch tiny model on the tiny data set (quiet, fp32)."""
    d = {
        "output_dir": str(out),
        "model": {"vision": tiny_vision_config("clip"), "llm": tiny_text_config(text, vocab_size=512),
                  "tokenizer": str(data["tokenizer"])},
        "data": {"train": str(data["pretrain" if stage == 1 else "instruct"]), "images": str(data["images"]),
                 "template": "plain" if stage == 1 else "v0", "max_length": 160},
        "train": {"vision": "frozen", "projector": "full", "llm": "frozen" if stage == 1 else "full",
                  "epochs": 1, "lr": 1e-3, "batch_size": 4, "progress": False, "precision": "fp32",
                  "warmup_ratio": 0.0, "seed": 0},
    }
    apply_overrides(d, overrides or {})
    return RunConfig.from_dict(d)


@pytest.fixture(scope="session")
def base_model_dir(tiny_data, tmp_path_factory):
    """A saved from-scratch tiny model whose tokenizer fits the tiny data (for model.from)."""
    from accelerate.utils import set_seed

    from vistune.model.checkpoint import save_model
    from vistune.train.stages import build_model

    cfg = tiny_config(tiny_data, tmp_path_factory.mktemp("unused"))
    set_seed(0)
    model, tok = build_model(cfg)
    return save_model(model, tok, tmp_path_factory.mktemp("base") / "model")


def subset(src, dst, n: int, keep=lambda r: True):
    """The first ``n`` records of a JSONL file that pass ``keep``."""
    import json

    rows = [json.loads(line) for line in open(src)]
    rows = [r for r in rows if keep(r)][:n]
    with open(dst, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return dst
