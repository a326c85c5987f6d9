"""Compressing connectors (Q-Former, resampler): token counts, save/load, BLIP-2 weights, training."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, noise_image
from transformers import Blip2Config, Blip2ForConditionalGeneration

from train_fixtures import tiny_config, tiny_data  # noqa: F401
from vistune.data.dataset import text_settings_for
from vistune.infer.engine import Engine
from vistune.infer.types import GenerationConfig, Prompt
from vistune.model.build import build_vlm
from vistune.model.checkpoint import LoadedModel, load_model, save_model
from vistune.model.tiny import tiny_text_config
from vistune.text.encode import encode_conversation
from vistune.train import run
from vistune.train.config import ConfigError
from vistune.train.features import storage_dtype

QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
OPTIONS = {"qformer": QFORMER, "resampler": {"heads": 2, "depth": 1}}


def connector_model(tokenizer, kind, n=5):
    return make_model(tokenizer, connector=kind, num_queries=n, connector_options=OPTIONS[kind])


@pytest.mark.parametrize("kind", ["qformer", "resampler"])
def test_each_image_is_num_queries_tokens_in_the_model_and_in_preprocessing(tokenizer, kind):
    model, tok = connector_model(tokenizer, kind, n=5)
    mlp, _ = make_model(tokenizer)
    assert model.config.num_image_tokens == 5
    assert mlp.config.num_image_tokens == mlp.vision.num_tokens() == 16  # the MLP model keeps its full grid
    px = torch.zeros(3, 3, model.vision.image_size, model.vision.image_size)
    assert model.encode_images(px).shape == (3, 5, model.language_model.config.hidden_size)
    text = text_settings_for(model.config, tok)
    ids = encode_conversation(text.tokenizer, text.template,
                              [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}],
                              image_token_id=text.image_token_id, num_image_tokens=text.num_image_tokens).input_ids
    assert sum(int(i == model.image_token_id) for i in ids) == 5
    # a batch spliced with those counts runs; the connector's weights are saved under connector.*
    out = model(torch.tensor([ids]), pixel_values=px[:1])
    assert out.logits.shape[1] == len(ids)
    assert any(k.startswith("connector.") for k in model.state_dict())
    # cached tower features feed the connector's fp32 LayerNorm, not a Linear: stored unrounded
    assert storage_dtype(model, "bf16") is None and storage_dtype(mlp, "bf16") == torch.bfloat16


@pytest.mark.parametrize("kind", ["qformer", "resampler"])
def test_a_saved_connector_model_loads_with_the_same_outputs(tokenizer, kind, tmp_path):
    model, tok = connector_model(tokenizer, kind, n=3)
    save_model(model, tok, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["connector"]["type"] == kind
    back, _ = load_model(tmp_path / "m")
    px = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    with torch.no_grad():
        assert torch.equal(back.encode_images(px), model.encode_images(px))


def tiny_blip2(path, seed=0):
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2),
        num_query_tokens=4)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # LayerNorms start at 1 / 0: move them so that loading them is checked
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    return model


def test_a_blip2_directory_gives_its_tower_and_qformer_with_identical_outputs(tokenizer, tmp_path):
    ref = tiny_blip2(tmp_path / "blip2")
    model, tok = build_vlm(str(tmp_path / "blip2"), tiny_text_config("llama", vocab_size=len(tokenizer)), tokenizer,
                           connector_from=str(tmp_path / "blip2"), projector_type="linear",
                           vision_feature_layer=-1, vision_feature_select="cls_patch")
    assert model.config.num_image_tokens == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = ref.vision_model(pixel_values=x).last_hidden_state  # post_layernorm applied: BLIP-2's ln_vision
        want = ref.qformer(query_embeds=ref.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats)
        got = model.eval().connector(model.vision(x))
    assert torch.equal(got, want.last_hidden_state)  # the same modules and weights, the same ops in order
    # the saved model (a BLIP-2 tower, rebuilt from its config) gives them again
    save_model(model, tok, tmp_path / "m")
    back, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back.connector(back.vision(x)), got)


def test_blip2_weights_that_do_not_fit_are_refused(tokenizer, tmp_path):
    tiny_blip2(tmp_path / "blip2")
    with pytest.raises(ValueError, match="resampler"):
        build_vlm(str(tmp_path / "blip2"), tiny_text_config("llama", vocab_size=len(tokenizer)), tokenizer,
                  connector="resampler", connector_from=str(tmp_path / "blip2"))
    with pytest.raises(ValueError, match="width 32, but the vision tower gives 48"):
        from vistune.model.tiny import tiny_vision_config

        build_vlm(tiny_vision_config("clip", hidden_size=48), tiny_text_config("llama", vocab_size=len(tokenizer)),
                  tokenizer, connector_from=str(tmp_path / "blip2"))


def test_connector_settings_are_checked(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="model.connector must be one of qformer, resampler"):
        tiny_config(tiny_data, tmp_path, {"model.connector": "perceiver"})
    with pytest.raises(ConfigError, match="train.connector: lora needs a qformer connector"):
        run(tiny_config(tiny_data, tmp_path / "r", {"model.connector": "resampler", "train.connector": "lora",
                                                    "model.connector_options": OPTIONS["resampler"],
                                                    "train.max_steps": 1}))
    with pytest.raises(ConfigError, match="model.num_queries must be >= 1"):
        tiny_config(tiny_data, tmp_path, {"model.connector": "qformer", "model.num_queries": 0})
    with pytest.raises(ConfigError, match=r"model.connector_options: connector options \['depth'\] are not "
                                          "Blip2QFormerConfig keys"):
        tiny_config(tiny_data, tmp_path, {"model.connector": "qformer", "model.connector_options": {"depth": 2}})
    with pytest.raises(ConfigError, match="model.connector_options shape a new connector"):
        tiny_config(tiny_data, tmp_path, {"model.connector_options": {"hidden_size": 8}})
    with pytest.raises(ConfigError, match=r"\['num_hidden_layers'\] are not resampler keys"):
        tiny_config(tiny_data, tmp_path, {"model.connector": "resampler",
                                          "model.connector_options": {"num_hidden_layers": 2}})


def state(path, prefix):
    model, _ = load_model(path)
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("kind", ["qformer", "resampler"])
def test_a_connector_model_trains_through_both_stages_and_answers(tiny_data, tmp_path, kind):
    connector = {"model.connector": kind, "model.num_queries": 4, "model.connector_options": OPTIONS[kind]}
    r1 = run(tiny_config(tiny_data, tmp_path / "s1", {**connector, "train.max_steps": 2}, stage=1))
    rows = [json.loads(x) for x in r1.metrics_path.read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    s1 = state(r1.model_dir, "connector.")
    assert s1 and json.loads((r1.model_dir / "config.json").read_text())["num_image_tokens"] == 4
    # Stage 2 as MiniGPT-4 trains it: the connector frozen, the projector alone learns.
    r2 = run(tiny_config(tiny_data, tmp_path / "s2", {"model": {"from": str(r1.model_dir)}, "train.max_steps": 2,
                                                        "train.llm": "frozen", "train.connector": "frozen"}))
    s2 = state(r2.model_dir, "connector.")
    assert all(torch.equal(s2[k], s1[k]) for k in s1)
    p1, p2 = state(r1.model_dir, "projector."), state(r2.model_dir, "projector.")
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)
    # ...and the default (train.connector follows train.projector) trains it
    r3 = run(tiny_config(tiny_data, tmp_path / "s3", {"model": {"from": str(r1.model_dir)}, "train.max_steps": 1}))
    s3 = state(r3.model_dir, "connector.")
    assert any(not torch.equal(s3[k], s1[k]) for k in s1)
    model, tok = load_model(r2.model_dir)
    engine = Engine(LoadedModel(model, tok))
    turns = [{"from": "human", "value": "<image>\nwhat shape is it?"}]
    out = engine.generate([Prompt(turns, [noise_image(1)])], GenerationConfig(max_new_tokens=4))[0]
    want = encode_conversation(tok, model.config.template, turns, image_token_id=model.image_token_id,
                               num_image_tokens=4, add_generation_prompt=True, check=False).input_ids
    assert out.prompt_tokens == len(want) and out.completion_tokens >= 1


def test_exports_refuse_a_connector_model_by_name(tokenizer):
    from vistune.interop import InteropError
    from vistune.interop.gguf_mmproj import plan_mmproj
    from vistune.interop.llava_hf import check_exportable

    model, tok = connector_model(tokenizer, "qformer", n=4)
    with pytest.raises(InteropError, match="qformer connector, which llava-hf cannot express"):
        check_exportable(model, tok)
    with pytest.raises(InteropError, match="qformer connector; llama.cpp"):
        plan_mmproj(model)


def test_a_qformer_connector_trains_with_lora_and_loads_merged(tiny_data, tmp_path):
    from tolerances import assert_reordered

    from vistune.model.adapters import is_adapter_dir
    from vistune.model.checkpoint import load_adapter_model

    connector = {"model.connector": "qformer", "model.num_queries": 4, "model.connector_options": QFORMER}
    r = run(tiny_config(tiny_data, tmp_path / "lora", {**connector, "train.max_steps": 2, "train.llm": "frozen",
                                                        "train.connector": "lora", "lora.r": 4}))
    assert is_adapter_dir(r.model_dir) and (r.model_dir / "connector_adapter" / "adapter_config.json").exists()
    assert json.loads((r.model_dir / "config.json").read_text())["adapter"]["modules"]["connector"] == "lora"
    base, _ = load_model(r.output_dir / "base")
    merged, _ = load_model(r.model_dir)
    wrapped, _ = load_adapter_model(r.model_dir)
    b, m = base.state_dict(), merged.state_dict()
    assert b.keys() == m.keys()
    changed = {k for k in b if not torch.equal(b[k], m[k])}
    assert any(k.startswith("connector.qformer.") for k in changed)  # the adapters, folded in
    assert not any(k.startswith(("connector.norm", "connector.query_tokens", "language_model.", "vision."))
                   for k in changed)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_reordered(merged.eval().encode_images(px), wrapped.eval().encode_images(px), terms=64, depth=4)
