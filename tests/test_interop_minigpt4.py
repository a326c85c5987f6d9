"""MiniGPT-4 import: its llama_proj .pth + a BLIP-2 directory + a Vicuna directory -> a vistune model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import noise_image
from interop_helpers import greedy, pixels_for, prompt
from test_connectors import tiny_blip2
from transformers import AutoModelForCausalLM

from vistune.cli import main
from vistune.interop import InteropError, UnsafeCheckpointError, load_foreign
from vistune.model.build import text_config_from_dict
from vistune.model.checkpoint import load_model
from vistune.model.tiny import tiny_text_config
from vistune.text.templates import render
from vistune.text.tokenizer import ensure_special_tokens

QUESTION = [{"from": "human", "value": "<image>\nwhat color is the small circle"}]


@pytest.fixture
def parts(tokenizer, tmp_path):
    blip2 = tiny_blip2(tmp_path / "blip2", seed=1)
    ensure_special_tokens(tokenizer)
    torch.manual_seed(2)
    vicuna = AutoModelForCausalLM.from_config(text_config_from_dict(tiny_text_config("llama", len(tokenizer))))
    vicuna.save_pretrained(str(tmp_path / "vicuna"))
    tokenizer.save_pretrained(str(tmp_path / "vicuna"))
    proj = {"llama_proj.weight": torch.randn(64, 24) * 0.1, "llama_proj.bias": torch.randn(64) * 0.1}
    torch.save({"model": proj}, tmp_path / "pretrained_minigpt4.pth")  # MiniGPT-4's layout: the layer under "model"
    return tmp_path, blip2.eval(), vicuna.eval(), proj


def minigpt4_logits(blip2, vicuna, proj, ids, image_token_id, pixels):
    """MiniGPT-4's forward: llama_proj(Q-Former(ln_vision(ViT(x)))) spliced into Vicuna's embeddings."""
    with torch.no_grad():
        feats = blip2.vision_model(pixel_values=pixels).last_hidden_state
        q = blip2.qformer(query_embeds=blip2.query_tokens.expand(pixels.shape[0], -1, -1),
                          encoder_hidden_states=feats).last_hidden_state
        img = F.linear(q, proj["llama_proj.weight"], proj["llama_proj.bias"])
        is_img = ids == image_token_id
        emb = vicuna.get_input_embeddings()(ids.masked_fill(is_img, 0))
        emb[is_img] = img.reshape(-1, img.shape[-1])
        return vicuna(inputs_embeds=emb).logits


def test_an_imported_minigpt4_answers_as_minigpt4_does(parts, tmp_path):
    d, blip2, vicuna, proj = parts
    args = ["import", str(d / "pretrained_minigpt4.pth"), "--from", "minigpt4", "--blip2", str(d / "blip2"),
            "--base", str(d / "vicuna"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    model, tok = load_model(tmp_path / "out")
    cfg = model.config
    assert (cfg.template, cfg.projector_type, cfg.num_image_tokens, cfg.connector["type"]) == (
        "minigpt4", "linear", 4, "qformer")
    assert (cfg.image.aspect, cfg.image.size) == ("resize", 32)
    # the prompt is MiniGPT-4's stage-2 template, <ImageHere> being vistune's image tokens
    text = render(cfg.template, QUESTION, add_generation_prompt=True).text
    assert text == "###Human: <Img><image></Img> what color is the small circle ###Assistant:"
    ids = prompt(model, tok, turns=QUESTION)
    px = pixels_for(model, noise_image(3))
    want = minigpt4_logits(blip2, vicuna, proj, ids, model.image_token_id, px)
    with torch.no_grad():
        got = model(ids, pixel_values=px).logits
    assert torch.equal(got, want)  # the same modules, weights and ops in the same order
    ref = greedy(lambda x: minigpt4_logits(blip2, vicuna, proj, x, model.image_token_id, px), ids)
    assert greedy(lambda x: model(x, pixel_values=px).logits, ids) == ref


def test_bad_minigpt4_inputs_name_the_culprit(parts, tmp_path):
    d, *_ = parts
    ckpt = d / "pretrained_minigpt4.pth"
    with pytest.raises(InteropError, match="needs --blip2"):
        load_foreign(ckpt, source="minigpt4", base=d / "vicuna")
    torch.save({"model": {"other.weight": torch.zeros(2)}}, d / "other.pth")
    with pytest.raises(InteropError, match="no llama_proj.weight, llama_proj.bias"):
        load_foreign(d / "other.pth", source="minigpt4", blip2=d / "blip2", base=d / "vicuna")
    torch.save({"model": {"llama_proj.weight": torch.zeros(64, 7), "llama_proj.bias": torch.zeros(64)}},
               d / "wide.pth")
    with pytest.raises(InteropError, match="reads 7 features but the Q-Former"):
        load_foreign(d / "wide.pth", source="minigpt4", blip2=d / "blip2", base=d / "vicuna")
    with pytest.raises(InteropError, match="not a BLIP-2"):
        load_foreign(ckpt, source="minigpt4", blip2=d / "vicuna", base=d / "vicuna")

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"model": {"llama_proj.weight": Payload()}}, d / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_foreign(d / "evil.pth", source="minigpt4", blip2=d / "blip2", base=d / "vicuna")
