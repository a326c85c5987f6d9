import math
import random

import pytest
import torch
from safetensors.torch import load_file

from vistune import hardware
from vistune.demo import foundation
from vistune.demo.foundation import (LMPretrainConfig, hard_negative, pretrain_language_model, region_weights,
                                     resolve_compile, resolve_precision, scene_caption)
from vistune.instruct.annotations import Box
from vistune.instruct.synth import WorldConfig, sample_scene
from vistune.text.tokenizer import train_bpe_tokenizer


def box(color, shape, size, x1, y1, side):
    return Box(shape, (float(x1), float(y1), float(x1 + side), float(y1 + side)),
               {"color": color, "shape": shape, "size": size})


def test_scene_caption_names_everything_left_to_right():
    scene = [box("red", "circle", "large", 40, 10, 20), box("blue", "square", "small", 2, 40, 12)]
    assert scene_caption(scene, 64) == "a small blue square in the bottom left, a large red circle in the top right."


def test_hard_negative_changes_exactly_one_thing_and_stays_valid():
    world = WorldConfig()
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng, world)
        twin = hard_negative(scene, rng, world)
        pairs = [(b.attributes["color"], b.attributes["shape"]) for b in twin]
        assert len(pairs) == len(set(pairs))  # objects stay distinct (colour, shape) pairs
        assert 1 <= len(twin) <= len(scene)
        if len(twin) == len(scene):
            changed = [a for a, b in zip(scene, twin) if (a.attributes, a.bbox) != (b.attributes, b.bbox)]
            assert len(changed) <= 2  # a swap touches two objects, other edits one
        for b in twin:
            x1, y1, x2, y2 = b.bbox
            assert 0 < x1 < x2 < world.image_size and 0 < y1 < y2 < world.image_size


def test_region_weights_average_the_cells_inside_each_box():
    w = region_weights([box("red", "circle", "large", 0, 0, 32), box("blue", "square", "small", 50, 50, 4)], 4, 64)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert set(w[0].nonzero().flatten().tolist()) == {0, 1, 4, 5}  # the top-left 2x2 cells
    assert w[1].nonzero().flatten().tolist() == [15]  # too small for any cell centre: its own cell


def test_precision_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(foundation, "native_bf16_cpu", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(foundation, "native_bf16_cpu", lambda: False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16")


def test_compile_auto_needs_bf16_a_cpp_compiler_and_python_headers(monkeypatch, tmp_path):
    import sysconfig

    import torch._inductor.cpp_builder as builder

    def no_compiler():
        raise RuntimeError("Failed to find a working C++ compiler")

    hardware.cpp_compiler.cache_clear()
    monkeypatch.setattr(builder, "get_cpp_compiler", no_compiler)
    try:
        assert hardware.cpp_compiler() is None
        assert resolve_compile("auto", "bf16") is False
        assert resolve_compile("on", "bf16") is True  # asked for: inductor's own error will say what is missing
    finally:
        hardware.cpp_compiler.cache_clear()
    monkeypatch.setattr(builder, "get_cpp_compiler", lambda: "g++")
    assert hardware.cpp_compiler() == "g++" and resolve_compile("auto", "bf16") is True
    assert resolve_compile("auto", "fp32") is False  # an fp32 step gains nothing from it
    assert resolve_compile("on", "fp32") is True
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**paths, "include": str(tmp_path)})  # no Python.h there
    assert resolve_compile("auto", "bf16") is False
    assert resolve_compile("off", "bf16") is False
    hardware.cpp_compiler.cache_clear()
    with pytest.raises(ValueError, match="compile must be auto, on or off"):
        resolve_compile("yes", "bf16")


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_lm_embeddings_start_at_the_configured_scale(tmp_path, std):
    texts = ["a small red circle on the left", "a large blue square at the top"] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    cfg = LMPretrainConfig(hidden_size=64, layers=1, heads=2, kv_heads=2, intermediate_size=128, steps=0,
                           batch_size=2, seq_len=8, embed_std=std)
    out = pretrain_language_model(texts, tok, tmp_path / "llm", cfg)
    emb = next(v for k, v in load_file(out / "model.safetensors").items() if k.endswith("embed_tokens.weight"))
    norms = emb.float().norm(dim=-1)
    # No training steps: the rows are the initialisation, std * sqrt(width) long; padding stays zero.
    assert norms[tok.pad_token_id] == 0
    others = torch.cat([norms[:tok.pad_token_id], norms[tok.pad_token_id + 1:]])
    assert others.mean().item() == pytest.approx(std * 64 ** 0.5, rel=0.1)


def test_stage0_follows_trainings_cosine_schedule_warming_up_from_one_step():
    from vistune.train.optim import lr_factor

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2e-3)
    schedule = foundation.cosine_schedule(opt, steps=50, warmup=20)
    rates = []
    for _ in range(50):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert rates == [2e-3 * lr_factor("cosine", 20, 50, warmup_from_zero=False)(s) for s in range(50)]

    def tuned_with(step, total=50, warmup=20):  # the cosine stage 0 was tuned with: warmup from 1/warmup
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    assert rates == [2e-3 * tuned_with(s) for s in range(50)]  # exactly: stage 0's models do not move
    assert rates[0] == 2e-3 / 20 and max(rates) == 2e-3 and rates[-1] < 1e-5
