"""Tiny architectures for tests, the demo and CPU experiments (HF config dicts)."""
from __future__ import annotations


def tiny_vision_config(kind: str = "clip", image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                       layers: int = 2, heads: int = 2) -> dict:
    common = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                  intermediate_size=hidden_size * 4, num_hidden_layers=layers, num_attention_heads=heads,
                  num_channels=3)
    if kind == "clip":
        return {"model_type": "clip_vision_model", "projection_dim": hidden_size, **common}
    if kind == "siglip":
        return {"model_type": "siglip_vision_model", **common}
    raise ValueError(f"unknown tiny vision kind {kind!r} (clip or siglip)")


def tiny_text_config(kind: str = "llama", vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, max_positions: int = 1024) -> dict:
    if kind in ("llama", "qwen2"):
        return {"model_type": kind, "vocab_size": vocab_size, "hidden_size": hidden_size,
                "intermediate_size": hidden_size * 4, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
                "max_position_embeddings": max_positions, "tie_word_embeddings": False}
    if kind == "gpt2":
        return {"model_type": "gpt2", "vocab_size": vocab_size, "n_embd": hidden_size, "n_layer": layers,
                "n_head": heads, "n_positions": max_positions, "tie_word_embeddings": True}
    raise ValueError(f"unknown tiny text kind {kind!r} (llama, qwen2 or gpt2)")
