"""Original LLaVA checkpoints (full, projector-only, LoRA) import to the same logits as
the equivalent model built directly."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import corpus, make_model, noise_image
from interop_helpers import (
    QUESTION,
    greedy,
    llava_config,
    pixels_for,
    prompt,
    save_tower,
    sentencepiece_llama_tokenizer,
    vistune_logits,
    write_original_llava,
)
from vistune.interop import InteropError, import_checkpoint, load_foreign
from vistune.model.projector import build_projector
from vistune.model.vlm import VisionLanguageModel
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_same_model(imported, reference, ref_tok):
    model, tok = imported.model, imported.tokenizer
    assert model.image_token_id == reference.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.config.num_image_tokens == reference.config.num_image_tokens
    ids = prompt(model, tok)
    assert ids.tolist() == prompt(reference, ref_tok, template=model.config.template).tolist()
    pix = pixels_for(model, noise_image(6, (36, 28)))
    # The same model computed again (imported or reloaded): at most another kernels' blocking.
    assert_reordered(vistune_logits(model, ids, pix), vistune_logits(reference, ids, pix),
                     TINY_TERMS, TINY_FORWARD)
    step = lambda m: (lambda x: m(x, pixel_values=pix).logits)  # noqa: E731
    assert greedy(step(model), ids) == greedy(step(reference), ids)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_full_checkpoint_imports_to_same_logits(tokenizer, tmp_path, fmt):
    ref, tok = make_model(tokenizer)
    src = write_original_llava(ref, tok, tmp_path / "llava-v1.5-tiny", fmt=fmt)
    imported = load_foreign(src, vision_tower=save_tower(ref, tmp_path / "clip"))
    assert imported.kind == "llava (full)"
    cfg = imported.model.config
    assert (cfg.template, cfg.projector_type, cfg.vision_feature_layer, cfg.vision_feature_select) == \
        ("vicuna_v1", "mlp2x_gelu", -2, "patch")
    assert cfg.image.aspect == "pad" and cfg.max_length == 2048
    assert_same_model(imported, ref, tok)


def test_tower_weights_in_checkpoint_win_over_vision_tower_dir(tokenizer, tmp_path):
    ref, tok = make_model(tokenizer)
    other, _ = make_model(tokenizer, seed=7)  # same architecture, other weights
    src = write_original_llava(ref, tok, tmp_path / "llava", with_tower=True)
    imported = load_foreign(src, vision_tower=save_tower(other, tmp_path / "clip"))
    assert_same_model(imported, ref, tok)


def test_whole_clip_checkpoint_as_vision_tower(tokenizer, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    ref, tok = make_model(tokenizer)
    vcfg = ref.vision.model.config.to_dict()
    clip = CLIPModel(CLIPConfig(vision_config=vcfg, text_config=dict(hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, vocab_size=99), projection_dim=32))
    clip.vision_model.load_state_dict(ref.vision.model.state_dict())
    clip.save_pretrained(str(tmp_path / "clip-full"))
    src = write_original_llava(ref, tok, tmp_path / "llava", fmt="safetensors")
    assert_same_model(load_foreign(src, vision_tower=tmp_path / "clip-full"), ref, tok)


def _stage1_dir(ref, tok, tmp_path, with_config=True):
    base = tmp_path / "vicuna-tiny"
    ref.language_model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    stage1 = tmp_path / "llava-pretrain"
    stage1.mkdir()
    # LLaVA saves named_parameters() of the projector: "model.mm_projector.0.weight", ...
    torch.save({f"model.mm_projector.{k}": v.clone() for k, v in ref.projector.state_dict().items()},
               stage1 / "mm_projector.bin")
    if with_config:
        (stage1 / "config.json").write_text(json.dumps(llava_config(ref, _name_or_path="lmsys/vicuna-7b-v1.5")))
    return base, stage1


def test_projector_only_checkpoint_over_base(tokenizer, tmp_path):
    ref, tok = make_model(tokenizer)
    base, stage1 = _stage1_dir(ref, tok, tmp_path)
    tower = save_tower(ref, tmp_path / "clip")
    with pytest.raises(InteropError, match="--base PATH.*lmsys/vicuna-7b-v1.5"):
        load_foreign(stage1, vision_tower=tower)
    imported = load_foreign(stage1, base=base, vision_tower=tower)
    assert imported.kind == "llava (projector only)" and imported.model.config.template == "plain"
    assert_same_model(imported, ref, tok)


def test_bare_mm_projector_file(tokenizer, tmp_path):
    ref, tok = make_model(tokenizer, projector="linear")
    base, stage1 = _stage1_dir(ref, tok, tmp_path, with_config=False)
    imported = load_foreign(stage1 / "mm_projector.bin", base=base, vision_tower=save_tower(ref, tmp_path / "clip"),
                            template="vicuna_v1")
    assert imported.model.config.projector_type == "linear"  # told by the keys: weight, bias
    assert imported.model.config.image.aspect == "crop"  # LLaVA's default 'square': CLIP's resize + centre crop
    assert any("no config.json" in n for n in imported.notes)
    assert_same_model(imported, ref, tok)


@pytest.mark.parametrize("adapter_format", ["safetensors", "bin"])
def test_lora_folder_merges_to_same_logits(tokenizer, tmp_path, adapter_format):
    ref, tok = make_model(tokenizer)
    base = tmp_path / "vicuna-tiny"
    ref.language_model.save_pretrained(str(base))
    tok.save_pretrained(str(base))

    torch.manual_seed(3)
    lora = get_peft_model(copy.deepcopy(ref.language_model),
                          LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False,
                                     task_type="CAUSAL_LM"))
    out = tmp_path / "llava-v1.5-tiny-lora"
    lora.save_pretrained(str(out))
    if adapter_format == "bin":  # as LLaVA's 2023 releases: .bin adapter, config from an old peft
        f = out / "adapter_model.safetensors"
        torch.save(load_file(str(f)), out / "adapter_model.bin")
        f.unlink()
        old = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({
            "base_model_name_or_path": "lmsys/vicuna-13b-v1.5", "bias": "none", "enable_lora": None,
            "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 8, "lora_dropout": 0.05,
            "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 4,
            "target_modules": sorted(old["target_modules"]), "task_type": "CAUSAL_LM"}))
    torch.manual_seed(4)
    projector = build_projector("mlp2x_gelu", 32, 64)  # trained beside the adapter: not the base's
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.state_dict().items()},
               out / "non_lora_trainables.bin")
    (out / "config.json").write_text(json.dumps(llava_config(ref)))

    expected = VisionLanguageModel(ref.config, ref.vision, lora.merge_and_unload(), projector).eval()
    tower = save_tower(ref, tmp_path / "clip")
    with pytest.raises(InteropError, match="--base"):
        load_foreign(out, vision_tower=tower)
    imported = load_foreign(out, base=base, vision_tower=tower)
    assert imported.kind == "llava (LoRA merged)"
    assert not any("lora" in n for n, _ in imported.model.named_parameters())  # merged, plain model
    assert_same_model(imported, expected, tok)
    ids, pix = prompt(ref, tok), pixels_for(ref, noise_image(6, (36, 28)))
    assert (vistune_logits(ref, ids, pix) - vistune_logits(imported.model, ids, pix)).abs().max() > 1e-3


def _tokenizer_without_image_token():
    """A Llama-style tokenizer as LLaVA ships it: no <image>, no <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_image_and_pad_tokens_added_consistently_with_embeddings(tokenizer, tmp_path):
    tok = _tokenizer_without_image_token()
    vocab = len(tok)
    ref, _ = make_model(tokenizer)  # donor of a tower and projector of the right widths
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    donor = VisionLanguageModel(ref.config, ref.vision, lm, ref.projector)
    src = write_original_llava(donor, tok, tmp_path / "llava")
    out = tmp_path / "vt"
    imported = import_checkpoint(src, out, vision_tower=save_tower(ref, tmp_path / "clip"))
    model, new_tok = imported.model, imported.tokenizer
    assert new_tok.convert_tokens_to_ids("<image>") == model.image_token_id == vocab
    assert new_tok.pad_token == "<pad>" and new_tok.pad_token_id == vocab + 1
    emb = model.language_model.get_input_embeddings().weight
    head = model.language_model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == vocab + 2
    torch.testing.assert_close(head[vocab:], head[:vocab].mean(0, keepdim=True).expand(2, -1))
    assert any("added 2 special token" in n for n in imported.notes)

    text_ids = torch.tensor([tok("the red circle is on the left")["input_ids"]])
    with torch.no_grad():
        # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
        assert_reordered(vistune_logits(model, text_ids, None)[..., :vocab], lm(text_ids).logits,
                         TINY_TERMS, TINY_FORWARD)
    import vistune

    loaded = vistune.load(out)  # ids and matrix stay consistent after saving
    ids = prompt(loaded.model, loaded.tokenizer)
    assert int(ids.max()) < emb.shape[0]
    # The same model computed again (imported or reloaded): at most another kernels' blocking.
    assert_reordered(vistune_logits(loaded.model, ids, pixels_for(loaded.model, noise_image(1))),
                     vistune_logits(model, ids, pixels_for(model, noise_image(1))), TINY_TERMS, TINY_FORWARD)


def test_clear_errors(tokenizer, tmp_path):
    ref, tok = make_model(tokenizer)
    src = write_original_llava(ref, tok, tmp_path / "llava")
    with pytest.raises(InteropError, match="openai/clip-vit-large-patch14-336.*--vision-tower"):
        load_foreign(src)
    with pytest.raises(InteropError, match="--from llava-hf given"):
        load_foreign(src, source="llava-hf", vision_tower=tmp_path)
    wide, _ = make_model(tokenizer, vision="siglip")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_hidden_size": 1024}))
    with pytest.raises(InteropError, match="mm_hidden_size is 1024"):
        load_foreign(src, vision_tower=save_tower(wide, tmp_path / "siglip"))
    (src / "config.json").write_text(json.dumps({**cfg, "image_aspect_ratio": "anyres_max_9",
                                                 "mm_patch_merge_type": "spatial_unpad"}))
    with pytest.raises(InteropError, match="other LLaVA-NeXT variants are not supported"):
        load_foreign(src, vision_tower=tmp_path)
    (src / "config.json").write_text(json.dumps({**cfg, "image_aspect_ratio": "anyres",
                                                 "mm_patch_merge_type": "spatial_unpad"}))
    with pytest.raises(InteropError, match="without model.image_newline"):
        load_foreign(src, vision_tower=save_tower(ref, tmp_path / "clip"))


def test_llava_v16_full_checkpoint_imports_to_same_anyres_logits(tokenizer, tmp_path):
    from safetensors.torch import save_file

    from vistune.data.anyres import tile_image
    from vistune.interop.llava_hf import export_llava_hf

    ref, tok = make_model(tokenizer, image_aspect="anyres", seed=2)
    d = tmp_path / "llava-v1.6-tiny"
    d.mkdir()
    sd = {k: v.clone() for k, v in ref.language_model.state_dict().items()}
    sd.update({f"model.mm_projector.{k}": v.clone() for k, v in ref.projector.state_dict().items()
               if k != "image_newline"})
    sd["model.image_newline"] = ref.projector.image_newline.detach().clone()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    grids = ref.config.image.grid_pinpoints  # [width, height], as LLaVA-NeXT writes them
    (d / "config.json").write_text(json.dumps(llava_config(ref, image_aspect_ratio="anyres",
                                                           mm_patch_merge_type="spatial_unpad",
                                                           image_grid_pinpoints=grids)))
    tok.save_pretrained(str(d))
    imported = load_foreign(d, vision_tower=save_tower(ref, tmp_path / "clip"))
    model = imported.model
    assert model.config.image.aspect == "anyres" and model.config.image.grid_pinpoints == grids
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tiles = tile_image(noise_image(3, (70, 30)), model.config.image)
    sizes = torch.tensor([tiles.size])
    from vistune.data.anyres import anyres_token_count
    from vistune.text.encode import encode_conversation

    n = anyres_token_count(tiles.size, model.config.image, model.config.num_image_tokens)
    ids = torch.tensor([encode_conversation(imported.tokenizer, "vicuna_v1", QUESTION, image_token_id=model.image_token_id,
                                            num_image_tokens=[n], add_generation_prompt=True).input_ids])
    with torch.no_grad():
        got = model(ids, pixel_values=tiles.pixels, image_sizes=sizes).logits
        want = ref(ids, pixel_values=tiles.pixels, image_sizes=sizes).logits
    assert_reordered(got, want, TINY_TERMS, TINY_FORWARD)
    export_llava_hf(model, imported.tokenizer, tmp_path / "hf")  # and on to llava-hf's LLaVA-NeXT
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "LlavaNextForConditionalGeneration"]


def test_released_layout_with_sentencepiece_tokenizer_end_to_end(tokenizer, tmp_path):
    """LLaVA v1.5 as released: .bin shards, tokenizer.model only, no <image>; import, train-style
    encoding, export, and transformers' processor gives vistune's ids and logits."""
    import shutil

    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from vistune.interop.llava_hf import export_llava_hf
    from vistune.text.encode import encode_conversation
    from vistune.text.templates import render

    sp_dir = sentencepiece_llama_tokenizer(tmp_path / "sp")
    sp = AutoTokenizer.from_pretrained(str(sp_dir))
    ref, _ = make_model(tokenizer)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(sp), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    src = write_original_llava(VisionLanguageModel(ref.config, ref.vision, lm, ref.projector), sp,
                               tmp_path / "llava-v1.5-tiny")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / f).unlink(missing_ok=True)
    shutil.copy(sp_dir / "tokenizer.model", src)
    shutil.copy(sp_dir / "tokenizer_config.json", src)

    imported = load_foreign(src, vision_tower=save_tower(ref, tmp_path / "clip"))
    model, tok = imported.model, imported.tokenizer
    assert model.image_token_id == len(sp) and tok.pad_token_id == len(sp) + 1
    turns = [{"from": "human", "value": "<image>\nwhat color is the circle"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "and the square"}, {"from": "gpt", "value": "blue square"}]
    enc = encode_conversation(tok, "vicuna_v1", turns, image_token_id=model.image_token_id, num_image_tokens=16)
    supervised = tok.decode([t for t in enc.labels if t != -100])
    assert "".join(supervised.split()) == "red</s>bluesquare</s>"  # replies + stops, nothing else

    out = export_llava_hf(model, tok, tmp_path / "hf")
    proc = AutoProcessor.from_pretrained(str(out))
    image = noise_image(2, (40, 30))
    convo = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "what color is the circle"}]},
             {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the square"}]
    # SentencePiece drops the "▁" after a literal "<s>", so the template leaves BOS to the processor.
    rendered = render("vicuna_v1", turns[:3], add_generation_prompt=True, eos=tok.eos_token, bos=tok.bos_token).text
    assert proc.apply_chat_template(convo, add_generation_prompt=True, tokenize=False) == rendered
    got = proc.apply_chat_template(convo, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    ids = prompt(model, tok, turns=turns[:3])
    assert got["input_ids"].tolist() == ids.tolist()
    hf = LlavaForConditionalGeneration.from_pretrained(str(out))
    with torch.no_grad():
        # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
        assert_reordered(hf(**got).logits, vistune_logits(model, ids, pixels_for(model, image)),
                         TINY_TERMS, TINY_FORWARD)
