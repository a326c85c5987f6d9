"""Stage 0 of the demo: the foundation models the paper takes as given.

A tiny vision encoder pretrained CLIP-style (contrastive image-caption loss) and a
tiny LM pretrained on the world's text. Both are saved in the standard transformers
formats (a CLIP vision model directory, a Llama causal-LM directory, a tokenizer),
so stages 1 and 2 load them exactly as they would load real CLIP and Vicuna weights.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ..data.images import ImageConfig, load_pixels
from ..model.checkpoint import atomic_directory, image_processor_dict, write_json

Progress = Callable[[int, float], None]  # (step, loss)


@dataclass
class VisionPretrainConfig:
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    embed_dim: int = 128
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0


@dataclass
class LMPretrainConfig:
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate_size: int = 768
    max_positions: int = 512
    steps: int = 300
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class _TextTower(nn.Module):
    """Caption encoder used only during contrastive pretraining (discarded afterwards)."""

    def __init__(self, vocab: int, dim: int, out: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.emb = nn.Embedding(vocab, dim, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.zeros(96, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, dim * 4, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.proj = nn.Linear(dim, out, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        x = self.enc(x, src_key_padding_mask=~mask)
        x = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.proj(x)


def pretrain_vision_encoder(
    image_paths: Sequence[Path],
    captions: Sequence[Sequence[str]],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    cfg: VisionPretrainConfig,
    progress: Progress | None = None,
) -> Path:
    """Contrastive image-caption pretraining; writes a CLIPVisionModel directory."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    vcfg = CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        projection_dim=cfg.embed_dim,
    )
    vision = CLIPVisionModel(vcfg)
    v_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False)
    text = _TextTower(len(tokenizer), cfg.hidden_size, cfg.embed_dim, tokenizer.pad_token_id)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*vision.parameters(), *v_proj.parameters(), *text.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    image_cfg = ImageConfig(size=cfg.image_size, aspect="pad")
    # The synthetic images are small: decode them all once.
    pixels = torch.stack([load_pixels(p, image_cfg) for p in image_paths])
    n = len(pixels)
    vision.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, cfg.steps, cfg.warmup)
        idx = rng.sample(range(n), min(cfg.batch_size, n))
        caps = [rng.choice(captions[i]) for i in idx]
        ids = tokenizer(caps, padding=True, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :96]
        # Mean-pooled patch tokens: every patch has to carry what the captions say.
        hs = vision(pixel_values=pixels[idx]).last_hidden_state
        img = F.normalize(v_proj(hs.mean(1)), dim=-1)
        txt = F.normalize(text(ids), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if progress:
            progress(step, loss.item())
    vision.eval()
    with atomic_directory(out_dir) as tmp:
        vision.save_pretrained(str(tmp))
        write_json(tmp / "preprocessor_config.json", image_processor_dict(image_cfg))
    return Path(out_dir)


def pretrain_language_model(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    cfg: LMPretrainConfig,
    progress: Progress | None = None,
) -> Path:
    """Next-token pretraining on the world's text; writes a LlamaForCausalLM directory + tokenizer."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    lcfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    lm = LlamaForCausalLM(lcfg)
    # One long stream of documents separated by EOS, cut into fixed windows.
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(stream, dtype=torch.long)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    lm.train()
    L = min(cfg.seq_len, len(data) - 1)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, cfg.steps, cfg.warmup)
        starts = [rng.randrange(0, len(data) - L) for _ in range(cfg.batch_size)]
        x = torch.stack([data[s: s + L] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16_ok()):
            logits = lm(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if progress:
            progress(step, loss.item())
    lm.eval()
    with atomic_directory(out_dir) as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def _bf16_ok() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") or "bf16" in \
            torch.backends.cpu.get_cpu_capability().lower()
    except Exception:
        return False
