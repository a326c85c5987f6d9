"""The decoder's last layer, computed only at the positions the loss reads.

A training loss reads the last hidden state only where the next token is supervised
(the assistant's replies), often a small share of a batch's positions. Every other
position of the last layer (its query, attention row, output projection and MLP)
feeds nothing, as that layer's keys and values are all a later layer would need and
there is none. So the decoder runs all layers but the last in full, and the last one
for the supervised rows only, beside the keys and values of every position. The loss
and its gradients are those of the full stack (up to rounding). It pays on shallow
LMs with short replies (measured: docs/benchmarks.md); the gain shrinks with
depth (at most one layer's work) and with long replies.

Written for the decoder layout that Llama, Mistral and Qwen2 share in transformers
(rotary embeddings, pre-norm attention and MLP); `supports` says whether a model has
it, and any other model takes the whole stack.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
# Mistral's and Qwen2's modeling files copy these two from Llama's.
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from ..text.encode import IGNORE_INDEX

# Decoder layers whose model's forward is the loop `hidden_at_rows` mirrors, and whose
# attention is eager_attention_forward's arithmetic (no soft-capping, no extra norms). The
# exact class: a layer wrapped by FSDP or a checkpoint wrapper has another, and its
# parameters are gathered only through its own forward, which the rows path bypasses.
_LAYOUTS = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}
_ATTENTION = {"eager", "sdpa"}


def supports(decoder: nn.Module, seq_len: int) -> bool:
    """Whether `hidden_at_rows` computes exactly what ``decoder`` would."""
    cfg = getattr(decoder, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _LAYOUTS:
        return False
    if getattr(cfg, "_attn_implementation", None) not in _ATTENTION:
        return False
    if decoder.training and float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return False  # the rows' attention would skip the dropout the other layers apply
    if sliding_window_applies(cfg, seq_len):
        return False
    # That class is transformers' own layer: its attributes are the ones hidden_at_rows reads.
    return type(decoder.layers[-1]).__name__ == _LAYOUTS[cfg.model_type] and len(decoder.layers) == cfg.num_hidden_layers


def sliding_window_applies(config, seq_len: int) -> bool:
    """Whether some layer's sliding window, shorter than the sequence, masks more than causal."""
    window = getattr(config, "sliding_window", None)
    if window is None or seq_len <= window:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Qwen2 and others name each layer's kind
        return "sliding_attention" in layer_types
    return getattr(config, "use_sliding_window", True) is not False  # Mistral: every layer


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """(B, M) positions whose next token is supervised, in order, M the most of any row.

    Rows with fewer fill up with unsupervised positions (their targets are IGNORE_INDEX,
    so the loss skips them).
    """
    keep = labels[:, 1:] != IGNORE_INDEX
    most = int(keep.sum(dim=1).max())
    # A stable sort puts each row's supervised positions first, in their order.
    return torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :most]


def last_layer_at_rows(layer: nn.Module, norm: nn.Module, hidden: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The decoder's last ``layer`` and final ``norm`` at ``rows`` only: (B, M, hidden).

    ``hidden`` is the input of that layer at every position: the rows attend to the keys
    and values of all positions at or before their own.
    """
    b, n, width = hidden.shape
    cos, sin = position_embeddings
    attn = layer.self_attn
    d = attn.head_dim
    x = layer.input_layernorm(hidden)
    # Keys and values of every position (the rows attend to them), queries at the rows only.
    k = attn.k_proj(x).view(b, n, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, -1, d).transpose(1, 2)
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    at_rows = rows[..., None].expand(-1, -1, width)
    q = attn.q_proj(x.gather(1, at_rows)).view(b, rows.shape[1], -1, d).transpose(1, 2)
    q_cos, q_sin = cos[0][rows][:, None], sin[0][rows][:, None]
    q = q * q_cos + rotate_half(q) * q_sin
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    # eager_attention_forward's arithmetic: scores in the compute dtype, softmax in fp32.
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    later = torch.arange(n, device=rows.device)[None, None, :] > rows[:, :, None]
    scores = scores.masked_fill(later[:, None], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(b, rows.shape[1], -1)
    h = hidden.gather(1, at_rows) + attn.o_proj(out)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return norm(h)


def hidden_at_rows(decoder: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                   rows: torch.Tensor, at_rows: Callable[..., torch.Tensor] = last_layer_at_rows) -> torch.Tensor:
    """The decoder's final hidden states (after its norm) at ``rows``: (B, M, hidden).

    ``attention_mask`` is what the other layers get for a right-padded batch: the causal
    mask (a 4D float mask for eager attention, None for SDPA). ``at_rows`` computes the
    last layer (``last_layer_at_rows``, or a compiled copy of it).
    """
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    position_embeddings = decoder.rotary_emb(embeds, positions)
    hidden = embeds
    for layer in decoder.layers[:-1]:
        hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                       position_ids=positions, use_cache=False)
    return at_rows(decoder.layers[-1], decoder.norm, hidden, position_embeddings, rows)
