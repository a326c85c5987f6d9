"""Shared pieces of the interop tests: tiny foreign checkpoints written from documented
key names, a greedy decoder, and a reference forward."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vistune.data.images import preprocess
from vistune.text.encode import encode_conversation

QUESTION = [{"from": "human", "value": "<image>\nwhat color is the small circle"}]


def prompt(model, tok, template=None, turns=QUESTION):
    enc = encode_conversation(tok, template or model.config.template, turns, image_token_id=model.image_token_id,
                              num_image_tokens=model.config.num_image_tokens, add_generation_prompt=True)
    return torch.tensor([enc.input_ids])


def vistune_logits(model, ids, pixels):
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits.float()


def greedy(step, ids: torch.Tensor, n: int = 6) -> list[int]:
    """Greedy tokens from ``step(ids) -> logits`` (full forward each step: tiny models only)."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = step(ids)[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def pixels_for(model, image):
    return preprocess(image, model.config.image)[None]


LLAVA_MM_KEYS = dict(
    mm_vision_tower="openai/clip-vit-large-patch14-336",
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_projector_type="mlp2x_gelu",
    mm_patch_merge_type="flat",
    image_aspect_ratio="pad",
    use_mm_proj=True,
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
    tokenizer_model_max_length=2048,
    tokenizer_padding_side="right",
    tune_mm_mlp_adapter=False,
)


def llava_config(model, **over) -> dict:
    """An original LLaVA config.json: the LLM's config plus LLaVA's mm_* keys."""
    cfg = model.language_model.config.to_dict()
    cfg.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
               mm_hidden_size=model.vision.hidden_size, mm_projector_type=model.config.projector_type)
    cfg.update({k: v for k, v in LLAVA_MM_KEYS.items() if k != "mm_projector_type"})
    cfg.update(over)
    return cfg


def write_bin_shards(sd: dict, d: Path, n_shards: int = 2) -> None:
    """pytorch_model-0000i-of-0000n.bin + index, as LLaVA's released checkpoints are stored."""
    keys = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k].clone() for k in keys[i::n_shards]}
        torch.save(part, d / name)
        weight_map.update({k: name for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_original_llava(model, tok, d: Path, *, fmt: str = "bin", with_tower: bool = False, **cfg_over) -> Path:
    """A full original-LLaVA checkpoint (LlavaLlamaForCausalLM key names) of a vistune model."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.clone() for k, v in model.language_model.state_dict().items()}  # model.*, lm_head.*
    sd.update({f"model.mm_projector.{k}": v.clone() for k, v in model.projector.state_dict().items()})
    if with_tower:
        sd.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone()
                   for k, v in model.vision.model.state_dict().items()})
    if fmt == "bin":
        write_bin_shards(sd, d)
    else:
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(llava_config(model, **cfg_over)))
    tok.save_pretrained(str(d))
    return d


def save_tower(model, d: Path) -> Path:
    model.vision.model.save_pretrained(str(d))
    return d


class Evil:
    """A pickle payload: unpickling it writes ``path`` (what a malicious .bin could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def poison(path: Path, marker: Path) -> None:
    """Replace a .bin with a pickle that runs code when loaded without weights_only."""
    torch.save({"model.mm_projector.0.weight": Evil(marker)}, path)


def sentencepiece_llama_tokenizer(d: Path, vocab_size: int = 300) -> Path:
    """A Llama SentencePiece tokenizer as LLaVA releases ship it: tokenizer.model +
    tokenizer_config.json only (no tokenizer.json, no <image>, no pad token)."""
    import sentencepiece as spm

    from conftest import corpus

    d.mkdir(parents=True, exist_ok=True)
    (d / "corpus.txt").write_text("\n".join(corpus(400)))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   byte_fallback=True, minloglevel=2)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": False, "model_max_length": 2048,
        "padding_side": "right"}))
    return d
