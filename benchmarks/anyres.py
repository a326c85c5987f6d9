"""AnyRes against a single view, on a task that needs resolution.

Each scene is a 448-672 px grey canvas (width and height drawn apart) with faint noise and one
thin dark bar, 36 x 6 px, at a random place, pointing one of four ways (vertical, horizontal,
rising, falling). The question asks which way it points. One 64 px view shrinks the scene 7-10x:
the bar becomes a blob about four pixels long and under one wide. AnyRes with 64 px tiles on up
to a 3 x 3 grid sees the scene at 192 px: the bar stays about 12 x 2 px.

The same tiny model (ViT 64 px, patch 16; LM 64 x 2; every part trained) is trained twice from
the same seed on the same records for the same steps, once with ``model.image_aspect: pad``
(one view) and once with ``anyres`` (grids "(1x1),...,(3x3)"), then answers held-out scenes
greedily through the engine. The template is ``plain`` (the image, then the answer): the
question is the same for every scene. Reported: held-out accuracy (chance: 25 %) and seconds per
training step, each system's.

    PYTHONPATH=src python benchmarks/anyres.py             # writes benchmarks/results/anyres.{json,md}
    PYTHONPATH=src python benchmarks/anyres.py --quick     # fewer records and steps, writes nothing
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WAYS = ("vertical", "horizontal", "rising", "falling")
QUESTION = "Which way does the bar point?"
SYSTEMS = {"single view": {"model.image_aspect": "pad"},
           "anyres": {"model.image_aspect": "anyres", "model.image_grid_pinpoints": "(1x1),...,(3x3)"}}


def scene(rng: random.Random, way: str, bar: tuple[int, int] = (36, 6)) -> Image.Image:
    w, h = rng.randint(448, 672), rng.randint(448, 672)
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-12, 13, (h, w, 1))
    img = Image.fromarray(np.clip(200 + noise, 0, 255).astype(np.uint8).repeat(3, 2), "RGB")
    half, diag = bar[0] // 2, round(bar[0] / 2 / 2 ** 0.5)
    cx, cy = rng.randint(half + 4, w - half - 4), rng.randint(half + 4, h - half - 4)
    d = {"vertical": (0, half), "horizontal": (half, 0), "rising": (diag, -diag), "falling": (diag, diag)}[way]
    ImageDraw.Draw(img).line([(cx - d[0], cy - d[1]), (cx + d[0], cy + d[1])], fill=(40, 40, 40), width=bar[1])
    return img


def make_data(root: Path, n_train: int, n_test: int, bar: tuple[int, int], seed: int = 0) -> dict:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            way = WAYS[i % len(WAYS)]
            name = f"{split}_{i:05d}.bmp"  # uncompressed: decoding is a visible share of a tiny step
            scene(rng, way, bar).save(root / "images" / name)
            rows[split].append({"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": way}]})
    rng.shuffle(rows["train"])
    for split, recs in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"train": root / "train.jsonl", "test": rows["test"], "images": root / "images"}


def train_and_score(name: str, over: dict, data: dict, tokenizer_dir: Path, out: Path, steps: int,
                    batch: int) -> dict:
    from vistune.data.images import open_image
    from vistune.infer.engine import Engine, GenerationConfig, Prompt
    from vistune.model.tiny import tiny_text_config, tiny_vision_config
    from vistune.train import run
    from vistune.train.config import RunConfig, apply_overrides

    cfg = {
        "output_dir": str(out),
        "model": {"vision": tiny_vision_config("clip", image_size=64, patch_size=16, hidden_size=64, layers=2),
                  "llm": tiny_text_config("llama", vocab_size=320, hidden_size=64, layers=2),
                  "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(data["train"]), "images": str(data["images"]), "template": "plain", "max_length": 320},
        "train": {"vision": "full", "projector": "full", "llm": "full", "max_steps": steps, "epochs": 100,
                  "lr": 3e-3, "batch_size": batch, "progress": False, "precision": "fp32", "warmup_ratio": 0.05,
                  "seed": 0, "log_every": 50},
    }
    apply_overrides(cfg, over)
    t0 = time.perf_counter()
    result = run(RunConfig.from_dict(cfg))
    train_s = time.perf_counter() - t0
    engine = Engine.from_path(result.model_dir)
    prompts = [Prompt.ask(QUESTION, [open_image(data["images"] / r["image"])]) for r in data["test"]]
    answers = []
    for i in range(0, len(prompts), 32):
        answers += engine.generate(prompts[i:i + 32], GenerationConfig(max_new_tokens=3))
    right = sum(a.text.strip().split(" ")[0].strip(".") == r["conversations"][1]["value"]
                for a, r in zip(answers, data["test"]))
    return {"system": name, "accuracy": right / len(prompts), "steps": result.steps,
            "s_per_step": result.elapsed_s / max(result.steps, 1), "train_s": train_s,
            "final_loss": result.final_loss, "image_tokens_median": _median_tokens(engine, prompts)}


def _median_tokens(engine, prompts) -> float:
    counts = [sum(engine.image_token_counts(p.images)) for p in prompts]
    return float(np.median(counts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=800, help="training scenes (default 800)")
    ap.add_argument("--test", type=int, default=200, help="held-out scenes (default 200)")
    ap.add_argument("--steps", type=int, default=500, help="training steps of each system (default 500)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bar-length", type=int, default=36, help="px (default 36)")
    ap.add_argument("--bar-width", type=int, default=6, help="px (default 6)")
    ap.add_argument("--quick", action="store_true", help="96 scenes, 20 steps; writes nothing")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.steps = 96, 32, 20
    from vistune.text.tokenizer import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = make_data(root / "data", args.train, args.test, (args.bar_length, args.bar_width))
        print(f"data: {args.train} + {args.test} scenes in {time.perf_counter() - t0:.1f} s", flush=True)
        texts = [f"{QUESTION} {w}\n" for w in WAYS] * 20
        train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(str(root / "tok"))
        rows = []
        for name, over in SYSTEMS.items():
            rows.append(train_and_score(name, over, data, root / "tok", root / name.replace(" ", "_"),
                                        args.steps, args.batch))
            print(json.dumps(rows[-1]), flush=True)
    single, anyres = rows
    summary = {"task": "bar direction in 448-672 px scenes, 64 px tower", "bar": [args.bar_length, args.bar_width],
               "train": args.train, "test": args.test,
               "steps": args.steps, "batch": args.batch, "systems": rows,
               "accuracy_gain_points": round(100 * (anyres["accuracy"] - single["accuracy"]), 1),
               "time_per_step_ratio": round(anyres["s_per_step"] / single["s_per_step"], 2)}
    print(json.dumps(summary, indent=1))
    if not args.quick:
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "anyres.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines = ["| system | held-out accuracy | s / step | image tokens (median) |", "|---|---|---|---|"]
        lines += [f"| {r['system']} | {100 * r['accuracy']:.1f} % | {r['s_per_step']:.3f} | "
                  f"{r['image_tokens_median']:.0f} |" for r in rows]
        (out / "anyres.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
