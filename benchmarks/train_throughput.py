"""Training throughput: vistune vs transformers' LlavaForConditionalGeneration.

One stage-2 training step (forward, backward, AdamW; tower frozen, projector + LLM
learning) on identical weights, config and batches (batch 8, a LLaVA-like mix of
short VQA answers and long descriptions):

    padded         vistune, padded batches            vs  LlavaForConditionalGeneration, padded
    packed         vistune, packed rows (no padding)  vs  LlavaForConditionalGeneration, padded
    feature cache  vistune stage 1 reading cached tower features (vistune cache-features)
                   vs vistune stage 1 opening images and running the tower, data loading included,
                   on two model shapes taken from real LLaVA checkpoints (STAGE1_SHAPES)

Steps of the compared systems are interleaved (round robin) so that the machine's
load drifts affect all alike; the medians are compared. Peak memory is measured per
system in a fresh subprocess: what its training steps add on top of the built model
(resident set growth on CPU, peak allocated on CUDA): activations, gradients, AdamW state.

    python benchmarks/train_throughput.py            # writes benchmarks/results/train_throughput.{json,md}
    python benchmarks/train_throughput.py --quick    # fewer steps
    python benchmarks/train_throughput.py --threads 1   # torch threads (default: torch's own choice)
    python benchmarks/train_throughput.py --stage1-only --threads 1   # only the feature-cache cases;
                                                        # prints, writes nothing to results/

What the feature cache can save is the tower's share of a stage-1 step: the frozen LLM
still runs forward and backward (input gradients, for the projector) over every image
token. That share is set by the pairing, so stage 1 is timed on shapes scaled down from
real checkpoints, keeping the tower : LLM ratio of linear-layer work per token and a
short-caption stage-1 sample (many image tokens, few text tokens):

    llava-onevision-0.5b   SigLIP-so400m (27 x 1152) under Qwen2-0.5B (24 x 896): tower ~1.15x the LLM per token
    llava-v1.5-7b          CLIP ViT-L/14-336 (24 x 1024, layer -2) under Vicuna-7B (32 x 4096): ~0.05x

``feature_cache_ratio`` is the onevision-0.5b case; ``feature_cache_ratio_by_shape`` has both,
``stage1_shapes`` each one's reference and scaled dimensions. The stage-1 systems also report
where their step goes (median seconds of data loading, i.e. dataset items + collate, and of
the model step: forward, backward, AdamW).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vistune.data.collate import PadCollator  # noqa: E402
from vistune.model.build import build_vlm  # noqa: E402
from vistune.model.tiny import tiny_text_config, tiny_vision_config  # noqa: E402
from vistune.text.encode import encode_conversation  # noqa: E402
from vistune.text.tokenizer import train_bpe_tokenizer  # noqa: E402
from vistune.train.packing import PackCollator, use_packed_attention  # noqa: E402
from vistune.train.speedups import for_training  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCH = 8
# The "6M" size of /work/shared/ENVIRONMENT.md: LM 256 x 4, ViT 128 x 4, 64 px / patch 8 (64 tokens).
SIZE = {"lm_hidden": 256, "lm_layers": 4, "vit_hidden": 128, "vit_layers": 4, "image": 64, "patch": 8,
        "vocab": 4096}

# Stage-1 shapes: real LLaVA pairings (reference) and the scaled-down models timed here.
# Widths and layer counts shrink together so that the tower's linear-layer work per token
# keeps its ratio to the LLM's (``linear_macs_per_token``); 256 image tokens (64 px, patch 4)
# and captions of 3-8 words keep stage 1's many-image-tokens-few-text-tokens samples.
STAGE1_SHAPES = {
    "llava-onevision-0.5b": {
        "reference": {
            "checkpoint": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
            "vision": {"arch": "siglip", "layers": 27, "hidden": 1152, "mlp": 4304, "heads": 16, "image": 384,
                       "patch": 14, "image_tokens": 729, "feature_layer": -1, "select": "full"},
            "text": {"arch": "qwen2", "layers": 24, "hidden": 896, "mlp": 4864, "heads": 14, "kv_heads": 2,
                     "vocab": 151936},
        },
        "scaled": {
            "vision": {"arch": "siglip", "layers": 9, "hidden": 144, "mlp": 538, "heads": 2, "image": 64,
                       "patch": 4, "feature_layer": -1},
            "text": {"arch": "qwen2", "layers": 8, "hidden": 112, "mlp": 608, "heads": 7, "kv_heads": 1,
                     "vocab": 4096},
            "caption_words": [3, 8],
        },
    },
    "llava-v1.5-7b": {
        "reference": {
            "checkpoint": "llava-hf/llava-1.5-7b-hf",
            "vision": {"arch": "clip", "layers": 24, "hidden": 1024, "mlp": 4096, "heads": 16, "image": 336,
                       "patch": 14, "image_tokens": 576, "feature_layer": -2, "select": "patch"},
            "text": {"arch": "llama", "layers": 32, "hidden": 4096, "mlp": 11008, "heads": 32, "kv_heads": 32,
                     "vocab": 32000},
        },
        "scaled": {
            "vision": {"arch": "clip", "layers": 6, "hidden": 32, "mlp": 128, "heads": 2, "image": 64,
                       "patch": 4, "feature_layer": -2},
            "text": {"arch": "llama", "layers": 8, "hidden": 128, "mlp": 344, "heads": 4, "kv_heads": 4,
                     "vocab": 4096},
            "caption_words": [3, 8],
        },
    },
}
HEADLINE_SHAPE = "llava-onevision-0.5b"


def linear_macs_per_token(shape: dict) -> dict:
    """Multiply-adds per token in the linear layers of the tower (layers it runs) and of the LLM.

    Attention scores and norms are left out: at full size they are ~10 % of either side.
    """
    v, t = shape["vision"], shape["text"]
    v_run = v["feature_layer"] % (v["layers"] + 1)  # layers up to the feature layer (the rest are skipped)
    vision = v_run * (4 * v["hidden"] ** 2 + 2 * v["hidden"] * v["mlp"])  # q k v o + fc1 fc2
    kv = t["hidden"] // t["heads"] * t["kv_heads"]
    text = t["layers"] * (2 * t["hidden"] ** 2 + 2 * t["hidden"] * kv + 3 * t["hidden"] * t["mlp"])  # + SwiGLU
    return {"vision_layers_run": v_run, "vision": vision, "text": text, "vision_over_text": round(vision / text, 4)}


WORDS = ("the a red green blue small large circle square person dog cat car tree street table left right "
         "top bottom near far sitting standing holding wearing picture image scene background front behind "
         "two three several people building sky road window light water grass white black yellow").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_tokenizer():
    rng = random.Random(0)
    texts = [sentence(rng, rng.randint(5, 20)) for _ in range(3000)]
    texts += ["A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:"] * 50
    return train_bpe_tokenizer(texts, vocab_size=2048)


def make_model(tok):
    torch.manual_seed(0)
    vision = tiny_vision_config("clip", image_size=SIZE["image"], patch_size=SIZE["patch"],
                                hidden_size=SIZE["vit_hidden"], layers=SIZE["vit_layers"], heads=4)
    text = tiny_text_config("llama", vocab_size=SIZE["vocab"], hidden_size=SIZE["lm_hidden"],
                            layers=SIZE["lm_layers"], heads=8, max_positions=2048)
    model, tok = build_vlm(vision, text, tok, projector_type="mlp2x_gelu", template="vicuna_v1", max_length=1024)
    return model, tok


def make_stage1_model(tok, shape: dict):
    """A vistune VLM of one STAGE1_SHAPES scaled shape, built like any other (tiny configs, sized)."""
    torch.manual_seed(0)
    v, t = shape["vision"], shape["text"]
    vision = tiny_vision_config(v["arch"], image_size=v["image"], patch_size=v["patch"], hidden_size=v["hidden"],
                                layers=v["layers"], heads=v["heads"])
    vision["intermediate_size"] = v["mlp"]
    text = tiny_text_config(t["arch"], vocab_size=t["vocab"], hidden_size=t["hidden"], layers=t["layers"],
                            heads=t["heads"], max_positions=2048)
    text.update(intermediate_size=t["mlp"], num_key_value_heads=t["kv_heads"])
    model, tok = build_vlm(vision, text, tok, projector_type="mlp2x_gelu", vision_feature_layer=v["feature_layer"],
                           template="plain", max_length=1024)
    return model, tok


def llava_twin(model):
    """LlavaForConditionalGeneration with the very same weights as the vistune model."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    vcfg = model.vision.model.config
    tcfg = model.language_model.config
    cfg = LlavaConfig(vision_config=AutoConfig.for_model(**vcfg.to_dict()).to_dict(),
                      text_config=tcfg.to_dict(), image_token_index=model.image_token_id,
                      image_seq_length=model.config.num_image_tokens, projector_hidden_act="gelu",
                      vision_feature_layer=model.config.vision_feature_layer,
                      vision_feature_select_strategy="default")
    twin = LlavaForConditionalGeneration(cfg)
    twin.model.vision_tower.load_state_dict(model.vision.model.state_dict())
    proj = model.projector
    twin.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    twin.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    twin.model.language_model.load_state_dict(model.language_model.model.state_dict())
    twin.lm_head.load_state_dict(model.language_model.lm_head.state_dict())
    return twin


def make_samples(model, tok, n: int, seed: int, stage: int = 2) -> list[dict]:
    """LLaVA-like mix: ~60 % short VQA (1-4 word answers), ~40 % long descriptions."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if stage == 1:
            turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": sentence(rng, rng.randint(6, 14))}]
            template = "plain"
        else:
            if rng.random() < 0.6:
                q, a = sentence(rng, rng.randint(6, 14)), sentence(rng, rng.randint(1, 4))
            else:
                q, a = "Describe the image in detail.", " ".join(sentence(rng, rng.randint(8, 16))
                                                               for _ in range(rng.randint(5, 10)))
            turns = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
            template = "vicuna_v1"
        enc = encode_conversation(tok, template, turns, image_token_id=model.image_token_id,
                                  num_image_tokens=model.config.num_image_tokens, max_length=1024, record_id=i)
        pix = torch.randn(1, 3, SIZE["image"], SIZE["image"], generator=gen)
        out.append({"id": str(i), "input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels),
                    "pixel_values": pix})
    return out


def set_stage(model, stage: int):
    model.vision.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.language_model.requires_grad_(stage == 2)
    model.train()
    model.vision.eval()
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def set_stage_twin(twin):
    twin.model.vision_tower.requires_grad_(False)
    twin.train()
    twin.model.vision_tower.eval()
    return torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-5)


class System:
    """One thing to time: a step function over a list of prepared batches."""

    def __init__(self, name, step, batches, tokens):
        self.name, self.step, self.batches, self.tokens = name, step, batches, tokens
        self.times: list[float] = []
        self.parts: dict[str, list[float]] = {}  # optional split of a step, filled by the step function
        self.i = 0

    def run_one(self, record: bool) -> None:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        t0 = time.perf_counter()
        parts = self.step(b)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
            for k, v in (parts or {}).items():
                self.parts.setdefault(k, []).append(v)

    def summary(self) -> dict:
        med = statistics.median(self.times)
        tokens = statistics.mean(self.tokens)
        return {"step_s_median": round(med, 4), "tokens_per_step": round(tokens, 1),
                "tokens_per_s": round(tokens / med, 1), "samples_per_s": round(BATCH / med, 2),
                "steps_timed": len(self.times),
                **{f"{k}_s_median": round(statistics.median(v), 4) for k, v in self.parts.items()}}


def vistune_step(model, opt, autocast):
    model = for_training(model)  # what the trainer runs: the same modules, train/speedups.py's forward

    def step(batch):
        with autocast():
            out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def llava_step(twin, opt, autocast):
    def step(batch):
        with autocast():
            out = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def model_batch(b: dict) -> dict:
    return {k: b[k] for k in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values",
                              "vision_features") if b.get(k) is not None}


def real_tokens(samples) -> int:
    return sum(len(s["input_ids"]) for s in samples)


# -- stage 1 through the real data path: images on disk vs the feature cache ------------------
def stage1_systems(model, tok, workdir: Path, n_batches: int, autocast, bf16: bool = False, *,
                   shape_name: str, caption_words: tuple[int, int] = (6, 14)):
    from PIL import Image

    from vistune.data.dataset import VLDataset, text_settings_for
    from vistune.data.records import write_records
    from vistune.train.batches import TrainCollator
    from vistune.train.features import FeatureCache, FeatureDataset, ensure_cache, storage_dtype

    rng = random.Random(1)
    img_dir = workdir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(BATCH * n_batches):
        arr = torch.randint(0, 255, (96, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        Image.fromarray(arr.numpy()).save(img_dir / f"{i}.jpg", quality=90)
        recs.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": sentence(rng, rng.randint(*caption_words))}]})
    data = workdir / "stage1.jsonl"
    write_records(recs, data)
    text = text_settings_for(model.config, tok, template="plain")
    # the cache a training run at this precision builds (bf16 runs store bf16 features)
    ensure_cache(model, data, img_dir, workdir / "fc", progress=False,
                 dtype=storage_dtype(model, "bf16" if bf16 else "no"))
    pix_ds = VLDataset(data, text, img_dir, model.config.image)
    feat_ds = FeatureDataset(pix_ds.records, text, FeatureCache(workdir / "fc"), model.config.image)
    collate = TrainCollator(tok.pad_token_id)
    opt = set_stage(model, 1)
    step = vistune_step(model, opt, autocast)

    batches = [list(range(k * BATCH, (k + 1) * BATCH)) for k in range(n_batches)]

    def runner(ds):
        # what the training loop's DataLoader does with data.num_workers=0 (the default), inline
        def run(k):
            t0 = time.perf_counter()
            batch = collate([ds[i] for i in batches[k % n_batches]])
            t1 = time.perf_counter()
            step(model_batch(batch))
            return {"data": t1 - t0, "model": time.perf_counter() - t1}
        return run

    tokens = [real_tokens([pix_ds[i] for i in b]) for b in batches]
    image_tokens = model.config.num_image_tokens
    caption = statistics.mean(len(pix_ds[i]["input_ids"]) - image_tokens for b in batches for i in b)
    info = {"image_tokens": image_tokens, "text_tokens_mean": round(caption, 1)}
    return (System(stage1_name("pixels", shape_name), runner(pix_ds), list(range(n_batches)), tokens),
            System(stage1_name("feature_cache", shape_name), runner(feat_ds), list(range(n_batches)), tokens),
            info)


def stage1_name(kind: str, shape_name: str) -> str:
    return f"stage1_{kind}[{shape_name}]"


def build_systems(n_batches: int, bf16: bool, workdir: Path, only: str | None = None, stage2: bool = True,
                  shapes: list[str] | None = None):
    """The systems to time; ``only``: one of them (memory child), ``stage2=False``: stage 1 only."""
    tok = make_tokenizer()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else torch.enable_grad
    want = (lambda n: only is None or n == only)
    systems, info = {}, {}
    if stage2 and any(want(n) for n in ("vistune_padded", "vistune_packed", "llava_padded")):
        systems, info["batches"] = stage2_systems(tok, n_batches, autocast)
    info["stage1"] = {}
    for name in shapes or list(STAGE1_SHAPES):
        if not (want(stage1_name("pixels", name)) or want(stage1_name("feature_cache", name))):
            continue
        scaled = STAGE1_SHAPES[name]["scaled"]
        # each shape its own model and data: stage 1 freezes the LLM, which must not leak elsewhere
        model_s1, tok_s1 = make_stage1_model(tok, scaled)
        s_pix, s_feat, s_info = stage1_systems(model_s1, tok_s1, workdir / name, n_batches, autocast, bf16,
                                               shape_name=name, caption_words=tuple(scaled["caption_words"]))
        assert not any(p.requires_grad for p in model_s1.language_model.parameters())
        systems[s_pix.name], systems[s_feat.name] = s_pix, s_feat
        info["stage1"][name] = s_info
    return {k: v for k, v in systems.items() if want(k)}, info


def stage2_systems(tok, n_batches: int, autocast):
    """Padded / packed vistune vs LlavaForConditionalGeneration, stage 2, on the SIZE model."""
    model, tok = make_model(tok)
    twin = llava_twin(model)
    batches = [make_samples(model, tok, BATCH, seed=k) for k in range(n_batches)]
    padded = [model_batch(PadCollator(tok.pad_token_id)(b)) for b in batches]
    use_packed_attention(model.language_model)  # what training does with data.packing (padded input: plain SDPA)
    # rows of up to max_length tokens, as training packs them (data.pack_length defaults to it)
    packed = [model_batch(PackCollator(tok.pad_token_id, capacity=model.config.max_length)(b)) for b in batches]
    tokens = [real_tokens(b) for b in batches]

    # Same weights, same batch, same loss: check before timing anything.
    with torch.no_grad():
        a = model(**padded[0]).loss
        b = twin(input_ids=padded[0]["input_ids"], attention_mask=padded[0]["attention_mask"],
                 pixel_values=padded[0]["pixel_values"], labels=padded[0]["labels"]).loss
        c = model(**packed[0]).loss
    assert torch.allclose(a, b, rtol=1e-4), (float(a), float(b))
    assert torch.allclose(a, c, rtol=1e-4), (float(a), float(c))

    # separate optimizers on separate copies would double memory; the models' weights
    # drift identically in neither case, which does not change step cost.
    opt = set_stage(model, 2)
    opt_twin = set_stage_twin(twin)
    systems = {
        "vistune_padded": System("vistune_padded", vistune_step(model, opt, autocast), padded, tokens),
        "vistune_packed": System("vistune_packed", vistune_step(model, opt, autocast), packed, tokens),
        "llava_padded": System("llava_padded", llava_step(twin, opt_twin, autocast), padded, tokens),
    }
    # stage 2 times what it claims: the LLM trains
    assert all(p.requires_grad for p in model.language_model.parameters())
    shapes = {"padded_shape": list(padded[0]["input_ids"].shape), "packed_shape": list(packed[0]["input_ids"].shape),
              "pad_fraction": round(1 - sum(tokens) / sum(p["input_ids"].numel() for p in padded), 3),
              "sample_lengths": [len(s["input_ids"]) for s in batches[0]]}
    return systems, shapes


def time_all(systems: dict, warmup: int, rounds: int) -> None:
    for s in systems.values():
        for _ in range(warmup):
            s.run_one(record=False)
    for _ in range(rounds):
        for s in systems.values():  # interleaved: load drift hits every system alike
            s.run_one(record=True)


def rss_peak_during(fn) -> tuple[int, int]:
    """(resident bytes before, peak resident bytes while ``fn`` runs), sampled every 2 ms."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base = rss()
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return base, max(peak[0], rss())


def peak_memory(name: str, args) -> float | None:
    """Peak memory (MB) of 3 steps of one system, in a fresh process."""
    cmd = [sys.executable, __file__, "--only", name, "--steps", "3", "--batches", "2"]
    if args.bf16:
        cmd.append("--bf16")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per system")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-system peak-memory subprocesses")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--stage1-only", action="store_true",
                    help="time only the stage-1 feature-cache cases; print them, write nothing to results/")
    ap.add_argument("--shape", action="append", choices=list(STAGE1_SHAPES),
                    help="stage-1 shape(s) to time (default: all); with --stage1-only")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # child process: peak memory of one system
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.shape and not args.stage1_only:
        ap.error("--shape goes with --stage1-only (a full run times every shape)")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as wd:
        if args.only:
            systems, _ = build_systems(args.batches, args.bf16, Path(wd), only=args.only)
            if args.only not in systems:
                ap.error(f"--only {args.only!r}: no such system")
            s = systems[args.only]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                for _ in range(args.steps):
                    s.run_one(record=False)
                peak = torch.cuda.max_memory_allocated()
            else:
                base, peak = rss_peak_during(lambda: [s.run_one(record=False) for _ in range(args.steps)])
            print(json.dumps({"peak_mb": round((peak - base) / 2**20, 1)}))
            return 0
        systems, info = build_systems(args.batches, args.bf16, Path(wd), stage2=not args.stage1_only,
                                      shapes=args.shape)
        time_all(systems, args.warmup, args.steps)
    res = {name: s.summary() for name, s in systems.items()}
    if not args.no_memory and not args.stage1_only:
        for name in res:
            res[name]["peak_step_memory_mb"] = peak_memory(name, args)

    def ratio(a, b):
        return round(res[a]["tokens_per_s"] / res[b]["tokens_per_s"], 3)

    by_shape = {name: ratio(stage1_name("feature_cache", name), stage1_name("pixels", name)) for name in info["stage1"]}
    stage1 = {name: {**STAGE1_SHAPES[name], **info["stage1"][name],
                     "linear_macs_per_token": {"reference": linear_macs_per_token(STAGE1_SHAPES[name]["reference"]),
                                               "scaled": linear_macs_per_token(STAGE1_SHAPES[name]["scaled"])},
                     "tower_s_median": round(res[stage1_name("pixels", name)]["model_s_median"]
                                             - res[stage1_name("feature_cache", name)]["model_s_median"], 4)}
              for name in info["stage1"]}
    command = ("python benchmarks/train_throughput.py" + (" --bf16" if args.bf16 else "")
               + (f" --threads {args.threads}" if args.threads else ""))
    if args.stage1_only:
        out = {"device": device_name(), "precision": "bf16 autocast" if args.bf16 else "fp32", "batch": BATCH,
               "systems": res, "feature_cache_ratio_by_shape": by_shape, "stage1_shapes": stage1,
               "command": command.replace(".py", ".py --stage1-only")}
        print(render_stage1(out))
        print(json.dumps({"feature_cache_ratio_by_shape": by_shape}))
        return 0
    out = {
        "benchmark": "train_throughput",
        "device": device_name(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "model": SIZE, "batch": BATCH, "batches": info["batches"],
        "systems": res,
        "padded_ratio": ratio("vistune_padded", "llava_padded"),
        "packed_ratio": ratio("vistune_packed", "llava_padded"),
        "feature_cache_ratio": by_shape[HEADLINE_SHAPE],
        "feature_cache_shape": HEADLINE_SHAPE,
        "feature_cache_ratio_by_shape": by_shape,
        "stage1_shapes": stage1,
        "targets": {"padded_ratio": 1.0, "packed_ratio": 1.5, "feature_cache_ratio": 1.5},
        "command": command,
    }
    out["meets_targets"] = {k: out[k] >= v for k, v in out["targets"].items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    table = render_table(out)
    (RESULTS / "train_throughput.md").write_text(table)
    print(table)
    return 0


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"


def render_table(out: dict) -> str:
    lines = [f"# Training throughput ({out['device']}, {out['precision']}, batch {out['batch']})", "",
             "| system | tokens/s | samples/s | step (s) | memory of the steps (MB) |", "|---|---|---|---|---|"]
    for name, r in out["systems"].items():
        mem = r.get("peak_step_memory_mb")
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {r['step_s_median']:.3f} | "
                     f"{'-' if mem is None else mem} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for k, v in out["targets"].items():
        lines.append(f"| {k} | {out[k]:.2f}x | >= {v}x {'(met)' if out['meets_targets'][k] else '(not met)'} |")
    lines += ["", f"`feature_cache_ratio` is the {out['feature_cache_shape']} shape.", ""]
    lines += render_stage1(out, header=False).splitlines()
    b = out["batches"]
    lines += ["", f"Stage 2: padded batch {b['padded_shape']} ({b['pad_fraction']:.0%} padding), packed "
              f"{b['packed_shape']}; sample lengths {b['sample_lengths']}.", ""]
    return "\n".join(lines)


def render_stage1(out: dict, header: bool = True) -> str:
    lines = []
    if header:
        lines += [f"# Stage 1, feature cache ({out['device']}, {out['precision']}, batch {out['batch']})", "",
                  "| system | tokens/s | step (s) |", "|---|---|---|"]
        lines += [f"| {n} | {r['tokens_per_s']:.0f} | {r['step_s_median']:.3f} |" for n, r in out["systems"].items()]
        lines.append("")
    lines += ["| stage-1 shape | tower / LLM linear work per token (reference, scaled) | image + text tokens "
              "| data loading (s) | tower (s) | step without / with cache (s) | cache ratio |",
              "|---|---|---|---|---|---|---|"]
    for name, sh in out["stage1_shapes"].items():
        pix, feat = out["systems"][stage1_name("pixels", name)], out["systems"][stage1_name("feature_cache", name)]
        macs = sh["linear_macs_per_token"]
        lines.append(f"| {name} | {macs['reference']['vision_over_text']:.3f}, {macs['scaled']['vision_over_text']:.3f} "
                     f"| {sh['image_tokens']} + {sh['text_tokens_mean']:.0f} "
                     f"| {pix['data_s_median']:.4f} / {feat['data_s_median']:.4f} | {sh['tower_s_median']:.4f} "
                     f"| {pix['step_s_median']:.3f} / {feat['step_s_median']:.3f} "
                     f"| {out['feature_cache_ratio_by_shape'][name]:.2f}x |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
