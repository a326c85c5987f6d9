"""The language side of a GGUF export: llama.cpp's model file (weights, tokenizer, chat template).

    transformers (Llama, Mistral, Qwen2)      GGUF
    model.embed_tokens.weight                 token_embd.weight
    model.layers.N.input_layernorm            blk.N.attn_norm
    model.layers.N.self_attn.{q,k,v,o}_proj   blk.N.attn_{q,k,v,output}
    model.layers.N.post_attention_layernorm   blk.N.ffn_norm
    model.layers.N.mlp.{gate,up,down}_proj    blk.N.ffn_{gate,up,down}
    model.norm.weight                         output_norm.weight
    lm_head.weight                            output.weight (left out when tied)

llama.cpp's ``llama`` architecture rotates adjacent pairs of each head's query and key
dimensions where transformers rotates the two halves, so Llama and Mistral query and
key rows are reordered head by head (the same model, another layout); ``qwen2`` rotates
halves like transformers and is written unchanged.

The tokenizer is written as llama.cpp's byte-level BPE (``tokenizer.ggml.model = gpt2``)
with the pre-tokenizer llama.cpp knows by name, and the chat template renders the
model's vistune template (`jinja_chat_template(..., llama_cpp=True)`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model.vlm import VisionLanguageModel
from .chat_template import jinja_chat_template, tokenizer_adds_bos
from .gguf_tensors import add_tensor, file_type, require_gguf
from .llava_hf import head_name, stop_token_ids
from .weights import InteropError

# transformers model_type -> llama.cpp architecture (Mistral runs as llama, as llama.cpp converts it)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED_LLMS = "Llama, Mistral and Qwen2 (model_type llama, mistral, qwen2)"

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

# Byte-level BPE pre-tokenizers of tokenizer.json -> llama.cpp's name for the same split
# (src/llama-vocab.cpp). The regexes are those of the Llama 3 and Qwen2 tokenizers.
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
SUPPORTED_TOKENIZERS = ("byte-level BPE with the GPT-2, SmolLM, Llama 3 or Qwen2 pre-tokenizer "
                        "(llama.cpp's gpt-2, smollm, llama-bpe, qwen2)")

# gguf.TokenType values
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass
class LlmPlan:
    """What the LLM file will hold, decided (and checked) before anything is written."""

    arch: str
    hparams: dict
    tensors: dict[str, torch.Tensor]
    vocab: dict
    chat_template: str
    notes: list[str] = field(default_factory=list)


def _byte_level(p: dict) -> bool:
    return p.get("type") == "ByteLevel"


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json; InteropError when it has none."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    found = pre.get("type", "none")
    if model.get("type") != "BPE" or not _byte_level(tokenizer_json.get("decoder") or {}):
        raise InteropError(f"the tokenizer is a {model.get('type', '?')} model with decoder "
                           f"{(tokenizer_json.get('decoder') or {}).get('type')}; GGUF export supports "
                           f"{SUPPORTED_TOKENIZERS}")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
        found = f"Split({regex!r})"
    elif kinds:
        found = "+".join(str(k) for k in kinds)
    raise InteropError(f"the tokenizer's pre-tokenizer ({found}) has no llama.cpp equivalent; GGUF export "
                       f"supports {SUPPORTED_TOKENIZERS}")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def plan_vocab(tokenizer: PreTrainedTokenizerBase, n_rows: int) -> dict:
    """The tokenizer as GGUF vocabulary fields (one entry per embedding row)."""
    if not getattr(tokenizer, "is_fast", False):
        raise InteropError(f"GGUF export reads the tokenizer's tokenizer.json; {type(tokenizer).__name__} is "
                           f"not a fast tokenizer (supported: {SUPPORTED_TOKENIZERS})")
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = bpe_pre_tokenizer(tj)
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_rows:
        raise InteropError(f"the tokenizer has {len(vocab)} tokens but the embedding only {n_rows} rows")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [_UNUSED] * n_rows
    for text, i in vocab.items():
        tokens[i], types[i] = text, _NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = _CONTROL if added.special else _USER_DEFINED
    ids = {}
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            ids[key] = int(tid)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return {"pre": pre, "tokens": tokens, "types": types, "merges": _merges(tj["model"]), "ids": ids,
            "add_bos": tokenizer_adds_bos(tokenizer),
            "add_eos": bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id}


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _check_llm(lm: PreTrainedModel) -> str:
    cfg = lm.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in ARCHS:
        raise InteropError(f"the language model is {kind!r} ({type(lm).__name__}); GGUF export supports "
                           f"{SUPPORTED_LLMS}")
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    legacy = getattr(cfg, "rope_scaling", None)
    if rope_type != "default" or (isinstance(legacy, dict) and legacy.get("rope_type", legacy.get("type"))
                                  not in (None, "default")):
        raise InteropError(f"the {kind} language model uses RoPE scaling {rope_type!r}; GGUF export writes "
                           "plain RoPE only (rope_type 'default')")
    for flag in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, flag, None):
            raise InteropError(f"the language model post-processes its logits ({flag}); GGUF export supports "
                               f"{SUPPORTED_LLMS} without it")
    if getattr(cfg, "mlp_bias", False):
        raise InteropError(f"the {kind} language model has MLP biases, which llama.cpp's {ARCHS[kind]} "
                           "architecture does not load")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise InteropError(f"the {kind} language model's activation is {cfg.hidden_act!r}; llama.cpp's "
                           f"{ARCHS[kind]} architecture uses SiLU")
    return ARCHS[kind]


def reorder_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Query/key rows from transformers' half-split RoPE layout to llama.cpp's pair layout, head by head."""
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def plan_llm(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase) -> LlmPlan:
    """Check that llama.cpp can run this language model and map its tensors; raises InteropError."""
    lm = model.language_model
    if hasattr(lm, "peft_config"):
        raise InteropError("the language model carries an unmerged adapter; export the run directory (merged)")
    arch = _check_llm(lm)
    cfg = lm.config
    head, prefix = head_name(lm), lm.base_model_prefix
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_head)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    for k, t in lm.state_dict().items():
        if k == f"{head}.weight":
            if not tied:
                tensors["output.weight"] = t
            continue
        rest = k[len(prefix) + 1:] if k.startswith(f"{prefix}.") else None
        if rest == "embed_tokens.weight":
            tensors["token_embd.weight"] = t
        elif rest == "norm.weight":
            tensors["output_norm.weight"] = t
        elif rest is not None and rest.startswith("layers."):
            i, name = rest[len("layers."):].split(".", 1)
            module, _, param = name.rpartition(".")
            if module not in _LAYER_NAMES:
                unknown.append(k)
                continue
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                t = reorder_rope_rows(t, n_head if module == "self_attn.q_proj" else n_kv)
            tensors[f"blk.{i}.{_LAYER_NAMES[module]}.{param}"] = t
        elif not k.endswith("rotary_emb.inv_freq"):
            unknown.append(k)
    if unknown:
        raise InteropError(f"the {cfg.model_type} language model has weights llama.cpp's {arch} architecture "
                           f"does not define: {unknown[:4]}")
    n_rows = lm.get_input_embeddings().weight.shape[0]
    vocab = plan_vocab(tokenizer, n_rows)
    stops = stop_token_ids(model, tokenizer)
    eot = next((s for s in stops if s != tokenizer.eos_token_id), None)
    if eot is not None:
        vocab["ids"]["eot"] = int(eot)
    notes = []
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < int(cfg.max_position_embeddings):
        notes.append(f"the {cfg.model_type} model attends within a sliding window of {window} tokens; llama.cpp's "
                     f"{arch} architecture attends to the whole context (the same up to {window} tokens)")
    hparams = {
        "context_length": int(cfg.max_position_embeddings),
        "embedding_length": hidden, "block_count": int(cfg.num_hidden_layers),
        "feed_forward_length": int(cfg.intermediate_size), "head_count": n_head, "head_count_kv": n_kv,
        "head_dim": head_dim, "rms_eps": float(cfg.rms_norm_eps), "rope_theta": _rope_theta(cfg),
        "vocab_size": n_rows,
    }
    return LlmPlan(arch, hparams, tensors, vocab, jinja_chat_template(model.config.template, tokenizer,
                                                                      llama_cpp=True), notes)


def write_llm(plan: LlmPlan, path: str | os.PathLike, outtype: str, name: str) -> Path:
    """Write the planned LLM file at ``path`` (a path inside the caller's atomic directory)."""
    gguf = require_gguf()
    a, h, v = plan.arch, plan.hparams, plan.vocab
    w = gguf.GGUFWriter(str(path), a)
    w.add_name(name)
    w.add_file_type(file_type(outtype))
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_uint32(f"{a}.context_length", h["context_length"])
    w.add_uint32(f"{a}.embedding_length", h["embedding_length"])
    w.add_uint32(f"{a}.block_count", h["block_count"])
    w.add_uint32(f"{a}.feed_forward_length", h["feed_forward_length"])
    w.add_uint32(f"{a}.attention.head_count", h["head_count"])
    w.add_uint32(f"{a}.attention.head_count_kv", h["head_count_kv"])
    w.add_uint32(f"{a}.attention.key_length", h["head_dim"])
    w.add_uint32(f"{a}.attention.value_length", h["head_dim"])
    w.add_uint32(f"{a}.rope.dimension_count", h["head_dim"])
    w.add_float32(f"{a}.rope.freq_base", h["rope_theta"])
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", h["rms_eps"])
    w.add_uint32(f"{a}.vocab_size", h["vocab_size"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", v["pre"])
    w.add_array("tokenizer.ggml.tokens", v["tokens"])
    w.add_array("tokenizer.ggml.token_type", v["types"])
    w.add_array("tokenizer.ggml.merges", v["merges"])
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id",
             "eot": "eot_token_id"}
    for key, tid in v["ids"].items():
        w.add_uint32(f"tokenizer.ggml.{names[key]}", tid)
    w.add_bool("tokenizer.ggml.add_bos_token", v["add_bos"])
    w.add_bool("tokenizer.ggml.add_eos_token", v["add_eos"])
    w.add_string("tokenizer.chat_template", plan.chat_template)
    for tname, t in plan.tensors.items():
        add_tensor(w, tname, t, outtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
