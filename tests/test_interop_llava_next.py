"""LLaVA-NeXT (anyres) interop, proven against transformers' own LlavaNextForConditionalGeneration."""
import json

import pytest
import torch
from conftest import make_model, noise_image
from interop_helpers import greedy
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from safetensors.torch import load_file

from vistune.data.anyres import tile_image
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.interop import InteropError, detect_format, import_checkpoint, load_foreign
from vistune.interop.llava_hf import export_llava_hf
from vistune.model.checkpoint import LoadedModel
from vistune.text.encode import encode_conversation

QUESTION = "what color is the small circle"


def vistune_inputs(model, tok, image):
    tiles = tile_image(image, model.config.image)
    turns = [{"from": "human", "value": "<image>\n" + QUESTION}]
    from vistune.data.anyres import anyres_token_count

    n = anyres_token_count(image.size, model.config.image, model.config.num_image_tokens)
    enc = encode_conversation(tok, model.config.template, turns, image_token_id=model.image_token_id,
                              num_image_tokens=[n], add_generation_prompt=True)
    return torch.tensor([enc.input_ids]), tiles.pixels, torch.tensor([tiles.size])


@pytest.mark.parametrize("vision,text,template", [("clip", "llama", "vicuna_v1"), ("siglip", "qwen2", "chatml")])
def test_export_loads_in_transformers_same_logits_and_tokens_on_three_aspects(tokenizer, tmp_path, vision, text,
                                                                              template):
    model, tok = make_model(tokenizer, vision, text, template=template, image_aspect="anyres", seed=4)
    with torch.no_grad():  # a trained newline, not the initial one
        model.projector.image_newline.mul_(3.0)
    out = export_llava_hf(model, tok, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == [[h, w] for w, h in model.config.image.grid_pinpoints]
    assert "image_newline" in load_file(str(out / "model.safetensors"))
    hf, info = LlavaNextForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    proc = AutoProcessor.from_pretrained(str(out))

    for size in [(60, 28), (28, 70), (45, 45)]:  # wide, tall, square
        image = noise_image(size[0], size)
        ids, pix, sizes = vistune_inputs(model, tok, image)
        convo = [{"role": "user", "content": [{"type": "image", "image": image},
                                              {"type": "text", "text": QUESTION}]}]
        enc = proc.apply_chat_template(convo, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
        assert enc["input_ids"].tolist() == ids.tolist(), size  # each image expanded to the same count
        assert torch.equal(enc["pixel_values"][0], pix) and enc["image_sizes"].tolist() == [[size[1], size[0]]]
        with torch.no_grad():
            mine = model(ids, pixel_values=pix, image_sizes=sizes).logits.float()
            theirs = hf(**enc).logits
        # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
        assert_reordered(mine, theirs, TINY_TERMS, TINY_FORWARD)
        want = greedy(lambda x: model(x, pixel_values=pix, image_sizes=sizes).logits, ids, n=6)
        gen = hf.generate(**enc, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
        assert gen == want[:len(gen)], size

    # llava-hf NeXT in: the very weights and settings, and the engine answers with them
    assert detect_format(out) == "llava-hf"
    back = import_checkpoint(out, tmp_path / "vt").model
    assert back.config.image.aspect == "anyres" and back.config.image.grid_pinpoints == model.config.image.grid_pinpoints
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    engine = Engine(LoadedModel(back, tok))
    reply = engine.generate([Prompt.ask(QUESTION, [noise_image(45, (45, 45))])], GenerationConfig(max_new_tokens=3))
    assert reply[0].completion_tokens >= 1


def test_import_next_without_vistune_settings_and_new_layout(tokenizer, tmp_path):
    model, tok = make_model(tokenizer, image_aspect="anyres", max_tiles=2)
    out = export_llava_hf(model, tok, tmp_path / "hf", key_layout="new")
    assert "model.image_newline" in load_file(str(out / "model.safetensors"))
    # only grids within max_tiles are written: transformers knows no bound
    assert all((h // 32) * (w // 32) <= 2 for h, w in json.loads((out / "config.json").read_text())[
        "image_grid_pinpoints"])
    (out / "vistune.json").unlink()  # as llava-hf's own checkpoints come
    back = load_foreign(out, template="vicuna_v1").model
    assert back.config.image.aspect == "anyres" and back.config.image.pinpoints == model.config.image.pinpoints
    assert torch.equal(back.projector.image_newline, model.projector.image_newline)


def test_export_of_an_anyres_model_needs_its_newline(tokenizer, tmp_path):
    model, tok = make_model(tokenizer, image_aspect="anyres")
    out = export_llava_hf(model, tok, tmp_path / "hf")
    sd = load_file(str(out / "model.safetensors"))
    del sd["image_newline"]
    from safetensors.torch import save_file

    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(InteropError, match="needs one image_newline weight"):
        load_foreign(out)


def test_gguf_export_refuses_anyres_clearly(tokenizer, tmp_path):
    from vistune.interop.gguf_mmproj import plan_mmproj

    model, _ = make_model(tokenizer, image_aspect="anyres")
    with pytest.raises(InteropError, match="GGUF export of anyres"):
        plan_mmproj(model)
