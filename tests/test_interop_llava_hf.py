"""llava-hf interop, proven against transformers' own LlavaForConditionalGeneration."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from conftest import make_model, noise_image
from interop_helpers import greedy, pixels_for, prompt, vistune_logits
from vistune.data.images import preprocess
from vistune.interop import InteropError, export_checkpoint, import_checkpoint, load_foreign
from vistune.interop.llava_hf import export_llava_hf
from vistune.model.checkpoint import save_model
from vistune.model.tiny import tiny_text_config, tiny_vision_config
from vistune.text.templates import render
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered, reordered

# A llava-1.5-style chat template, written for this test: "USER: <image>\nQ ASSISTANT:".
LLAVA15_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _hf_dir(tokenizer, tmp_path, seed=0):
    """A tiny llava-hf checkpoint made by transformers itself, with its processor."""
    torch.manual_seed(seed)
    v = {k: x for k, x in tiny_vision_config("clip").items() if k != "model_type"}
    t = {k: x for k, x in tiny_text_config("llama", vocab_size=len(tokenizer)).items() if k != "model_type"}
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v, initializer_range=0.2),
                      text_config=LlamaConfig(**t, initializer_range=0.2),
                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    hf = LlavaForConditionalGeneration(cfg).eval()
    d = tmp_path / "hf"
    hf.save_pretrained(str(d))
    ip = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA15_TEMPLATE).save_pretrained(str(d))
    return hf, d


def _relayout(d, layout):
    """Rewrite the weights of a llava-hf dir in another documented key layout."""
    sd = load_file(str(d / "model.safetensors"))  # transformers 5: language_model.model.*, vision_tower.* (no vision_model.)
    out = {}
    for k, t in sd.items():
        if k.startswith("vision_tower."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        if layout == "new":
            if k.startswith("language_model.lm_head."):
                k = k[len("language_model."):]
            elif k.startswith("language_model.model."):
                k = "model.language_model." + k[len("language_model.model."):]
            else:
                k = "model." + k
        out[k] = t
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["as-saved", "hub-old", "new"])
def test_import_transformers_llava_same_logits_and_tokens(tokenizer, tmp_path, layout):
    hf, d = _hf_dir(tokenizer, tmp_path)
    if layout != "as-saved":
        _relayout(d, layout)
    imported = load_foreign(d)
    model, tok = imported.model, imported.tokenizer
    assert imported.kind == "llava-hf"
    assert model.config.template == "vicuna_v1"  # recognised from the USER:/ASSISTANT: chat template
    assert model.config.num_image_tokens == 16 and model.image_token_id == hf.config.image_token_id
    assert model.config.image.aspect == "pad" and model.config.vision_feature_select == "patch"

    image = noise_image(3, (40, 24))
    ids = prompt(model, tok)
    proc = AutoProcessor.from_pretrained(str(d))
    hf_pixels = proc(images=[image], text="<image>", return_tensors="pt")["pixel_values"]
    # Pixels up to (0 - mean) / std ~ 2.2, normalised in another order: a few ulps.
    torch.testing.assert_close(pixels_for(model, image), hf_pixels, **reordered(terms=1, scale=2.2))
    a = vistune_logits(model, ids, hf_pixels)
    with torch.no_grad():
        b = hf(input_ids=ids, pixel_values=hf_pixels).logits
    # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
    assert_reordered(a, b, TINY_TERMS, TINY_FORWARD)
    other = vistune_logits(model, ids, pixels_for(model, noise_image(9, (40, 24))))
    assert (other - a).abs().max() > 1e-3  # the image matters at this tolerance
    mine = greedy(lambda x: model(x, pixel_values=hf_pixels).logits, ids)
    theirs = greedy(lambda x: hf(input_ids=x, pixel_values=hf_pixels).logits, ids)
    assert mine == theirs


def test_import_sharded_llava_hf_and_saves(tokenizer, tmp_path):
    hf, d = _hf_dir(tokenizer, tmp_path, seed=1)
    hf.save_pretrained(str(d), max_shard_size="100KB")
    (d / "model.safetensors").unlink()
    assert (d / "model.safetensors.index.json").exists()
    out = import_checkpoint(d, tmp_path / "vt", template="llava_v1")
    import vistune

    loaded = vistune.load(tmp_path / "vt")
    assert loaded.template.name == "llava_v1"
    ids, pix = prompt(loaded.model, loaded.tokenizer), pixels_for(loaded.model, noise_image(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pix).logits
    # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
    assert_reordered(vistune_logits(loaded.model, ids, pix), ref, TINY_TERMS, TINY_FORWARD)
    assert out.notes == []  # template given: nothing guessed


CASES = [("clip", "llama", "vicuna_v1"), ("siglip", "qwen2", "chatml"), ("clip", "gpt2", "llava_v1")]


@pytest.mark.parametrize("vision,text,template", CASES)
def test_export_loads_in_transformers_same_logits_tokens_prompt(tokenizer, tmp_path, vision, text, template):
    model, tok = make_model(tokenizer, vision, text, template=template)
    out = export_llava_hf(model, tok, tmp_path / "hf")
    hf, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    proc = AutoProcessor.from_pretrained(str(out))

    image = noise_image(2, (30, 44))
    convo = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "what color is the small circle"}]}]
    text_prompt = proc.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    rendered = render(template, [{"from": "human", "value": "<image>\nwhat color is the small circle"}],
                      add_generation_prompt=True, eos=tok.eos_token, bos=tok.bos_token).text
    assert text_prompt == tok.bos_token + rendered
    enc = proc.apply_chat_template(convo, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    ids = prompt(model, tok)
    assert enc["input_ids"].tolist() == ids.tolist()  # same ids, image tokens expanded alike
    pix = pixels_for(model, image)
    # Pixels up to (0 - mean) / std ~ 2.2, normalised in another order: a few ulps.
    torch.testing.assert_close(enc["pixel_values"], pix, **reordered(terms=1, scale=2.2))

    with torch.no_grad():
        theirs = hf(**enc).logits
    # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
    assert_reordered(vistune_logits(model, ids, pix), theirs, TINY_TERMS, TINY_FORWARD)
    mine = greedy(lambda x: model(x, pixel_values=pix).logits, ids, n=6)
    gen = hf.generate(**enc, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert gen == mine[:len(gen)]
    if len(gen) < 6:  # generate stopped at a stop token; vistune's loop produced it too
        assert gen[-1] in (hf.generation_config.eos_token_id if isinstance(hf.generation_config.eos_token_id, list)
                           else [hf.generation_config.eos_token_id])


def test_export_multi_turn_prompt_and_assistant_mask_match_vistune(tokenizer, tmp_path):
    model, tok = make_model(tokenizer, template="vicuna_v1")
    out = export_llava_hf(model, tok, tmp_path / "hf")
    proc = AutoProcessor.from_pretrained(str(out))
    turns = [{"from": "human", "value": "<image>\nwhat shape"}, {"from": "gpt", "value": "a red circle"},
             {"from": "human", "value": "how many"}, {"from": "gpt", "value": "two"}]
    convo = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if t["from"] == "human" else "assistant",
         "content": [{"type": "image"}, {"type": "text", "text": "what shape"}] if i == 0 else t["value"]}
        for i, t in enumerate(turns)]
    text = proc.apply_chat_template(convo, tokenize=False)
    want = render("vicuna_v1", turns, system="Be brief.", eos=tok.eos_token, bos=tok.bos_token).text
    assert text == tok.bos_token + want
    # The {% generation %} spans are exactly what vistune supervises (replies + stop).
    text_only = [c for c in convo if c["role"] != "user"] and [
        {"role": "user", "content": "what shape"}, {"role": "assistant", "content": "a red circle"}]
    enc = proc.tokenizer.apply_chat_template(text_only, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    from vistune.text.encode import encode_conversation

    mine = encode_conversation(tok, "vicuna_v1", [{"from": "human", "value": "what shape"},
                                                  {"from": "gpt", "value": "a red circle"}],
                               image_token_id=model.image_token_id, num_image_tokens=16)
    assert enc["input_ids"] == mine.input_ids
    assert enc["assistant_masks"] == [int(lab != -100) for lab in mine.labels]


@pytest.mark.parametrize("aspect,size", [("pad", (40, 24)), ("resize", (40, 24)), ("crop", (30, 30))])
def test_exported_image_processor_matches_vistune(tokenizer, tmp_path, aspect, size):
    model, tok = make_model(tokenizer, image_aspect=aspect)
    out = export_llava_hf(model, tok, tmp_path / "hf")
    proc = AutoProcessor.from_pretrained(str(out))
    image = noise_image(4, size)
    got = proc(images=[image], text="<image>", return_tensors="pt")["pixel_values"]
    # Pixels up to (0 - mean) / std ~ 2.2, normalised in another order: a few ulps.
    torch.testing.assert_close(got, preprocess(image, model.config.image)[None], **reordered(terms=1, scale=2.2))


@pytest.mark.parametrize("text,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_round_trip_is_bit_identical(tokenizer, tmp_path, text, dtype):
    model, tok = make_model(tokenizer, text=text, template="chatml", image_aspect="resize", max_length=777)
    model.to(dtype)
    src = save_model(model, tok, tmp_path / "vt")
    export_checkpoint(src, tmp_path / "hf")
    back = import_checkpoint(tmp_path / "hf", tmp_path / "vt2").model
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert back.config.to_dict() | {"vision": 0, "text": 0} == model.config.to_dict() | {"vision": 0, "text": 0}
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f1, \
            safe_open(str(tmp_path / "vt2" / "model.safetensors"), "pt") as f2:
        assert set(f1.keys()) == set(f2.keys())
        assert all(torch.equal(f1.get_tensor(k), f2.get_tensor(k)) for k in f1.keys())
    lm = back.language_model
    if text == "gpt2":  # exported untied for transformers' sake, tied again on import
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def test_export_new_key_layout_and_shards(tokenizer, tmp_path):
    model, tok = make_model(tokenizer)
    out = export_llava_hf(model, tok, tmp_path / "hf", key_layout="new", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all(k.startswith(("model.", "lm_head.")) for k in index["weight_map"])
    assert "model.vision_tower.vision_model.embeddings.patch_embedding.weight" in index["weight_map"]
    hf, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    ids, pix = prompt(model, tok), pixels_for(model, noise_image(5))
    with torch.no_grad():
        # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
        assert_reordered(hf(input_ids=ids, pixel_values=pix).logits, vistune_logits(model, ids, pix),
                         TINY_TERMS, TINY_FORWARD)


def test_export_old_layout_names_match_the_hub_checkpoints(tokenizer, tmp_path):
    model, tok = make_model(tokenizer)
    out = export_llava_hf(model, tok, tmp_path / "hf")
    keys = set(load_file(str(out / "model.safetensors")))
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys and "multi_modal_projector.linear_2.bias" in keys
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_index"] == model.image_token_id and cfg["image_seq_length"] == 16
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["vision_feature_layer"] == -2
    assert cfg["text_config"]["architectures"] == ["LlamaForCausalLM"]  # vLLM picks the LM class from it


def test_chatml_export_stops_on_im_end(tokenizer, tmp_path):
    model, tok = make_model(tokenizer, text="qwen2", template="chatml")
    out = export_llava_hf(model, tok, tmp_path / "hf")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("projector", ["linear", "mlp3x_gelu"])
def test_export_refuses_projectors_llava_hf_cannot_express(tokenizer, tmp_path, projector):
    model, tok = make_model(tokenizer, projector=projector)
    with pytest.raises(InteropError, match="mlp2x_gelu") as e:
        export_llava_hf(model, tok, tmp_path / "hf")
    assert "Keep the vistune format" in str(e.value) and projector in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_import_refuses_a_projector_vistune_cannot_express(tokenizer, tmp_path):
    _, d = _hf_dir(tokenizer, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["projector_hidden_act"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="projector_hidden_act='relu'"):
        load_foreign(d)
