"""Stage 0 of the demo: the foundation models the paper takes as given.

A tiny vision encoder pretrained CLIP-style and a tiny LM pretrained on the world's
text. Both are saved in standard transformers formats (a ResNet vision model
directory with its preprocessor_config.json, a Llama causal-LM directory, a
tokenizer), so stages 1 and 2 load them exactly as they would load real CLIP and
Vicuna weights.

The vision encoder is a small ResNet, as in CLIP's own RN50 family, not a ViT: on
this world a 4-layer ViT trained from scratch needed ~250 supervised steps before it
told a circle from a square at all, a ResNet of the same cost ~25. The contrastive
loss has two levels: whole images against full captions, each scene in the batch
paired with a hard-negative twin that differs in one attribute of one object (so
colour alone never identifies a caption), and object regions (their boxes pooled
over the feature map) against object phrases, as in region-level CLIP variants.
Together they make every visual token say what is where, which is what stage 2
reads.
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
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, ResNetConfig, ResNetModel

from ..data.images import ImageConfig, preprocess
from ..files import atomic_directory, write_json
from ..hardware import can_compile_cpu, native_bf16_cpu
from ..instruct.annotations import Box
from ..instruct.synth import COLORS, SHAPES, WorldConfig, draw_scene, location_phrase, name, sample_scene
from ..model.checkpoint import image_processor_dict
from ..model.vision import VisionTower
from ..train.optim import lr_factor
from ..train.precision import autocast

Progress = Callable[[int, float], None]  # (step, loss)


@dataclass
class VisionPretrainConfig:
    image_size: int = 64
    # ResNet stages: the stem divides the size by 4, each stage after the first by 2, so two
    # stages give an 8 x 8 map (64 tokens) at 64 px. At 4 x 4 a small object shares its cell with
    # its neighbours' edges, and the cell no longer tells its shape.
    widths: tuple[int, ...] = (48, 96)
    embed_dim: int = 128
    steps: int = 200
    scenes: int = 32  # fresh scenes per step, each with its hard-negative twin
    lr: float = 2e-3
    warmup: int = 20
    region_weight: float = 1.0
    seed: int = 0
    precision: str = "fp32"  # autocast: auto = bf16 where the CPU has it natively (see DemoConfig.precision)


@dataclass
class LMPretrainConfig:
    # 192 wide, 6 heads of 32: as accurate as 256 wide at a lower cost per stage-2 step.
    hidden_size: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 6
    intermediate_size: int = 576
    max_positions: int = 512
    # A short pretraining: the world's formulaic text gives the LM its words and formats, not the
    # lookups stage 2 has to learn.
    steps: int = 50
    # Word embeddings start ten times larger than transformers' default (std 0.02): rows ~2.9 long at
    # 192 wide, near the projected image tokens' ~4.5 instead of 0.29. Small words are likely drowned
    # at their own positions by what the first layers mix in from the loud image tokens; the lookups
    # stage 2 teaches ("the colour of the triangle") then formed on some seeds only.
    embed_std: float = 0.21
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0
    precision: str = "auto"  # autocast: auto = bf16 where the CPU has it natively


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Training's cosine schedule (`train.optim.lr_factor`), stepped after each update; its warmup
    starts at 1/warmup, as stage 0 was tuned with (its short runs lose a step starting from 0)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("cosine", warmup, steps, warmup_from_zero=False))


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
        ids = ids[:, : self.pos.shape[0]]
        mask = ids != self.pad_id
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        x = self.enc(x, src_key_padding_mask=~mask)
        x = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.proj(x)


# -- contrastive batches from the world ---------------------------------------------
def scene_caption(boxes: list[Box], size: int) -> str:
    """Every object with size, colour, shape and place, left to right."""
    ordered = sorted(boxes, key=lambda b: b.center)
    return ", ".join(f"a {name(b, True)} {location_phrase(b, size, size)}" for b in ordered) + "."


def hard_negative(boxes: list[Box], rng: random.Random, world: WorldConfig) -> list[Box]:
    """The scene with one attribute of one object changed (shape, colour, size, a swap of
    two objects' shapes, or one object dropped)."""
    boxes = list(boxes)
    present = {(b.attributes["color"], b.attributes["shape"]) for b in boxes}
    i = rng.randrange(len(boxes))
    b = boxes[i]
    color, shape = b.attributes["color"], b.attributes["shape"]
    edit = rng.choice(("shape", "color", "size", "swap", "drop") if len(boxes) > 1 else ("shape", "color", "size"))
    if edit == "shape":
        options = [s for s in SHAPES if (color, s) not in present]
        if options:
            new = rng.choice(options)
            boxes[i] = Box(new, b.bbox, {**b.attributes, "shape": new})
    elif edit == "color":
        options = [c for c in COLORS if (c, shape) not in present]
        if options:
            boxes[i] = Box(shape, b.bbox, {**b.attributes, "color": rng.choice(options)})
    elif edit == "size":
        other = "large" if b.attributes["size"] == "small" else "small"
        side = rng.randint(*(world.small_px if other == "small" else world.large_px))
        cx, cy = b.center
        x1 = min(max(1, round(cx - side / 2)), world.image_size - side - 1)
        y1 = min(max(1, round(cy - side / 2)), world.image_size - side - 1)
        boxes[i] = Box(shape, (float(x1), float(y1), float(x1 + side), float(y1 + side)),
                       {**b.attributes, "size": other})
    elif edit == "swap":
        j = rng.choice([k for k in range(len(boxes)) if k != i])
        o = boxes[j]
        swapped = {(color, o.attributes["shape"]), (o.attributes["color"], shape)}
        if o.attributes["shape"] != shape and not swapped & present:
            boxes[i] = Box(o.category, b.bbox, {**b.attributes, "shape": o.attributes["shape"]})
            boxes[j] = Box(shape, o.bbox, {**o.attributes, "shape": shape})
    else:
        boxes.pop(i)
    return boxes


def region_weights(boxes: list[Box], grid: int, size: int) -> torch.Tensor:
    """(objects, grid*grid) averaging weights over the feature-map cells inside each box."""
    cell = size / grid
    w = torch.zeros(len(boxes), grid * grid)
    centres = (torch.arange(grid) + 0.5) * cell
    for k, b in enumerate(boxes):
        x1, y1, x2, y2 = b.bbox
        inside_x = (centres >= x1) & (centres <= x2)
        inside_y = (centres >= y1) & (centres <= y2)
        m = (inside_y[:, None] & inside_x[None, :]).flatten().float()
        if m.sum() == 0:  # a small box between cell centres: its centre's cell
            cx, cy = b.center
            m[min(grid - 1, int(cy // cell)) * grid + min(grid - 1, int(cx // cell))] = 1
        w[k] = m / m.sum()
    return w


def pretrain_vision_encoder(
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    cfg: VisionPretrainConfig,
    world: WorldConfig | None = None,
    progress: Progress | None = None,
) -> Path:
    """Contrastive pretraining on fresh scenes of the world; writes a ResNet model directory."""
    world = world or WorldConfig(image_size=cfg.image_size)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    vision = ResNetModel(ResNetConfig(
        embedding_size=cfg.widths[0], hidden_sizes=list(cfg.widths), depths=[1] * len(cfg.widths),
        layer_type="basic", downsample_in_first_stage=False,
    ))
    width = cfg.widths[-1]
    image_proj = nn.Linear(width, cfg.embed_dim, bias=False)
    region_proj = nn.Linear(width, cfg.embed_dim, bias=False)
    text = _TextTower(len(tokenizer), width, cfg.embed_dim, tokenizer.pad_token_id)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*vision.parameters(), *image_proj.parameters(), *region_proj.parameters(), *text.parameters(),
              logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    image_cfg = ImageConfig(size=cfg.image_size, aspect="pad")

    def encode_text(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return F.normalize(text(ids), dim=-1)

    def clip_loss(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, symmetric: bool) -> torch.Tensor:
        logits = logit_scale.exp().clamp(max=100) * a @ b.t()
        loss = F.cross_entropy(logits, target)
        return (loss + F.cross_entropy(logits.t(), target)) / 2 if symmetric else loss

    # The features are read exactly as stages 1 and 2 read them: the last stage's map,
    # flattened into cells by the VLM's own tower wrapper.
    features = VisionTower(vision, feature_layer=-1, image_size=cfg.image_size)
    precision = resolve_precision(cfg.precision)
    schedule = cosine_schedule(opt, cfg.steps, cfg.warmup)
    vision.train()
    for step in range(cfg.steps):
        scenes = []
        for _ in range(cfg.scenes):
            boxes = sample_scene(rng, world)
            scenes += [boxes, hard_negative(boxes, rng, world)]
        pixels = torch.stack([preprocess(draw_scene(b, world, rng), image_cfg) for b in scenes])
        with autocast(precision):
            fmap = features(pixels).float()  # (B, cells, C)
        grid = int(math.isqrt(fmap.shape[1]))
        # Whole images vs captions (the twin of each scene is its hard negative).
        img = F.normalize(image_proj(fmap.mean(1)), dim=-1)
        caps = encode_text([scene_caption(b, world.image_size) for b in scenes])
        loss = clip_loss(img, caps, torch.arange(len(scenes)), symmetric=True)
        # Object regions vs the batch's distinct object phrases.
        regions = torch.cat([region_weights(b, grid, world.image_size) @ f for b, f in zip(scenes, fmap)])
        phrases = [name(o, with_size=True) for b in scenes for o in b]
        distinct = sorted(set(phrases))
        target = torch.tensor([distinct.index(p) for p in phrases])
        reg = F.normalize(region_proj(regions), dim=-1)
        loss = loss + cfg.region_weight * clip_loss(reg, encode_text(distinct), target, symmetric=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
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
    if cfg.embed_std != lcfg.initializer_range:
        # Only then: at transformers' own scale the random stream, and so the run, stays as it was.
        with torch.no_grad():
            emb = lm.model.embed_tokens.weight
            emb.normal_(0.0, cfg.embed_std)
            emb[tokenizer.pad_token_id].zero_()
    # One long stream of documents separated by EOS; training windows start where a
    # document starts, so what a document's later text refers to is in the window.
    stream: list[int] = []
    doc_starts: list[int] = []
    for t in texts:
        doc_starts.append(len(stream))
        stream.extend(tokenizer(t, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(stream, dtype=torch.long)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    lm.train()
    L = min(cfg.seq_len, len(data) - 1)
    valid_starts = [s for s in doc_starts if s + L < len(data)] or [0]
    precision = resolve_precision(cfg.precision)
    schedule = cosine_schedule(opt, cfg.steps, cfg.warmup)
    for step in range(cfg.steps):
        starts = [rng.choice(valid_starts) for _ in range(cfg.batch_size)]
        x = torch.stack([data[s: s + L] for s in starts])
        with autocast(precision):
            logits = lm(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        schedule.step()
        if progress:
            progress(step, loss.item())
    lm.eval()
    with atomic_directory(out_dir) as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on CPUs with native bf16, else ``fp32``; ``bf16`` / ``fp32`` as given."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return ("bf16" if native_bf16_cpu() else "fp32") if precision == "auto" else precision


def resolve_compile(setting: str, precision: str) -> bool:
    """``auto`` -> compile a bf16 run where inductor can build CPU kernels (a C++ compiler,
    Python's headers). Only bf16: a demo-shaped fp32 step runs no faster compiled
    (`benchmarks/train_compile.py --precision fp32`), so there the compile would be lost."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {setting!r}")
    return precision == "bf16" and can_compile_cpu() if setting == "auto" else setting == "on"
