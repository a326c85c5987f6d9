"""AnyRes against a single view, on a task that needs resolution.

Each scene is a 448-672 px canvas (width and height drawn apart) covered by a fine sine grating
(stripes) of random phase and contrast, over a faint mottled background; the stripes run one of
four ways (vertical, horizontal, rising, falling) and the question asks which. The grating's
period is 0.8-1.0 px of the 64 px single view (scene's long side / 64 times that): one 64 px
view holds under one pixel per period, so its resampling filter blurs the stripes to grey and
only a rounding-level trace remains under the mottle. AnyRes with 64 px tiles on up to a 3 x 3
grid sees the scene at 192 px, 2.4-3 px per period: the stripes are plain in every tile.

Before training, the benchmark measures that on scenes drawn like the held-out ones, through
vistune's own preprocessing: how much the grating changes the pixels each system's model gets
(grey levels, rms, against the same scene without it), and how often a simple orientation feature
(the image's Fourier power in four 45-degree wedges, largest wins) names the way (chance 25 %).
AnyRes's base tile is the single view squashed: it is left out of the tiles' numbers.

The same tiny model (ViT 64 px, patch 16; LM 64 x 2; every part trained) is trained twice from
the same seed on the same records for the same steps, once with ``model.image_aspect: pad``
(one view) and once with ``anyres`` (grids "(1x1),...,(3x3)"), then answers held-out scenes
greedily through the engine. The template is ``plain`` (the image, then the answer): the
question is the same for every scene. Reported: held-out accuracy (chance: 25 %), seconds per
training step and image tokens per scene, each system's.

    PYTHONPATH=src python benchmarks/anyres.py             # writes benchmarks/results/anyres.{json,md}
    PYTHONPATH=src python benchmarks/anyres.py --quick     # fewer records and steps, writes nothing
    PYTHONPATH=src python benchmarks/anyres.py --check     # the signal check alone, writes nothing
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WAYS = ("vertical", "horizontal", "rising", "falling")
# The stripes' normal, degrees anticlockwise from +x with image y pointing down.
NORMAL = {"vertical": 0.0, "horizontal": 90.0, "rising": 135.0, "falling": 45.0}
QUESTION = "Which way do the stripes run?"
SYSTEMS = {"single view": {"model.image_aspect": "pad"},
           "anyres": {"model.image_aspect": "anyres", "model.image_grid_pinpoints": "(1x1),...,(3x3)"}}
TILE = 64
PERIOD = (0.8, 1.0)  # single-view pixels per grating period
CONTRAST = (30.0, 60.0)  # grey levels, the sine's amplitude
MOTTLE = 8.0  # grey levels, the background's noise before smoothing
MOTTLE_CELL = 8  # px of the scene per background noise value


def draw(rng: random.Random, way: str) -> dict:
    """One scene's random settings (drawn apart from rendering, so a scene can be rendered without its grating)."""
    w, h = rng.randint(448, 672), rng.randint(448, 672)
    return {"way": way, "size": (w, h), "period": rng.uniform(*PERIOD) * max(w, h) / TILE,
            "contrast": rng.uniform(*CONTRAST), "phase": rng.uniform(0, 2 * np.pi), "seed": rng.randrange(1 << 30)}


def render(s: dict, grating: bool = True) -> Image.Image:
    w, h = s["size"]
    noise = np.random.default_rng(s["seed"]).normal(0, MOTTLE, (h // MOTTLE_CELL + 1, w // MOTTLE_CELL + 1))
    grey = np.asarray(Image.fromarray(noise.astype(np.float32), "F").resize((w, h), Image.Resampling.BICUBIC))
    grey = grey + 128.0
    if grating:
        a = np.deg2rad(NORMAL[s["way"]])
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        grey = grey + s["contrast"] * np.sin(2 * np.pi * (x * np.cos(a) - y * np.sin(a)) / s["period"] + s["phase"])
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")


def image_config(over: dict):
    from vistune.data.images import ImageConfig

    return ImageConfig(size=TILE, aspect=over["model.image_aspect"],
                       grid_pinpoints=over.get("model.image_grid_pinpoints"))


def model_view(img: Image.Image, cfg) -> np.ndarray:
    """The grey levels (0-255) a model with image settings ``cfg`` gets from ``img``: the single view, or
    AnyRes's grid put back together (its base tile left out)."""
    from vistune.data.anyres import grid_shape, tile_image
    from vistune.data.images import preprocess

    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (cfg.mean, cfg.std))
    if cfg.aspect != "anyres":
        return 255 * (preprocess(img, cfg).numpy() * std + mean).mean(0)
    tiles = 255 * (tile_image(img, cfg).pixels[1:].numpy() * std[None] + mean[None]).mean(1)
    cols, rows = grid_shape(img.size, cfg)
    return np.block([[tiles[r * cols + c] for c in range(cols)] for r in range(rows)])


def content_box(size: tuple[int, int], cfg, margin: int = 2) -> tuple[slice, slice]:
    """Where the scene lies in ``model_view``'s output (not the padding), ``margin`` px inside."""
    ys, xs = np.nonzero(model_view(Image.new("L", size, 255), cfg) > 250)
    return slice(ys.min() + margin, ys.max() + 1 - margin), slice(xs.min() + margin, xs.max() + 1 - margin)


def orientation_feature(grey: np.ndarray) -> str:
    """The way whose 45-degree wedge of the Fourier power (DC left out) is largest."""
    g = grey - grey.mean()
    power = np.abs(np.fft.fft2(g)) ** 2
    ky, kx = np.meshgrid(np.fft.fftfreq(g.shape[0]), np.fft.fftfreq(g.shape[1]), indexing="ij")
    angle, radius = np.rad2deg(np.arctan2(-ky, kx)) % 180, np.hypot(kx, ky)
    wedge = [power[(np.abs((angle - NORMAL[w] + 90) % 180 - 90) < 22.5) & (radius > 0)].sum() for w in WAYS]
    return WAYS[int(np.argmax(wedge))]


def signal_check(n: int, seed: int = 1) -> dict:
    """What the grating puts into each system's pixels, on ``n`` fresh scenes: its rms (grey levels, the
    scene with it minus the same scene without it), the background's rms, and the orientation feature's accuracy."""
    rng = random.Random(seed)
    scenes = [draw(rng, WAYS[i % len(WAYS)]) for i in range(n)]
    out = {}
    for name, over in SYSTEMS.items():
        cfg = image_config(over)
        added, background, hits = [], [], 0
        for s in scenes:
            box = content_box(s["size"], cfg)
            full, bare = (model_view(render(s, g), cfg)[box] for g in (True, False))
            added.append(float(np.sqrt(np.mean((full - bare) ** 2))))
            background.append(float(bare.std()))
            hits += orientation_feature(full) == s["way"]
        out[name if name != "anyres" else "anyres tiles"] = {
            "grating_rms": round(float(np.mean(added)), 2), "background_rms": round(float(np.mean(background)), 2),
            "orientation_feature_accuracy": round(hits / n, 3)}
    return {"scenes": n, **out}


def make_data(root: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            way = WAYS[i % len(WAYS)]
            name = f"{split}_{i:05d}.bmp"  # uncompressed: decoding is a visible share of a tiny step
            render(draw(rng, way)).save(root / "images" / name)
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
    ap.add_argument("--train", type=int, default=1600, help="training scenes (default 1600)")
    ap.add_argument("--test", type=int, default=200, help="held-out scenes (default 200)")
    ap.add_argument("--steps", type=int, default=250, help="training steps of each system (default 250)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--check-scenes", type=int, default=48, help="scenes of the signal check (default 48)")
    ap.add_argument("--quick", action="store_true", help="96 scenes, 20 steps; writes nothing")
    ap.add_argument("--check", action="store_true", help="the signal check alone; writes nothing")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.steps = 96, 32, 20
    check = signal_check(args.check_scenes)
    print("signal check:", json.dumps(check), flush=True)
    if args.check:
        return 0
    from vistune.text.tokenizer import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = make_data(root / "data", args.train, args.test)
        print(f"data: {args.train} + {args.test} scenes in {time.perf_counter() - t0:.1f} s", flush=True)
        texts = [f"{QUESTION} {w}\n" for w in WAYS] * 20
        train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(str(root / "tok"))
        rows, load = [], [os.getloadavg()[0]]
        for name, over in SYSTEMS.items():
            rows.append(train_and_score(name, over, data, root / "tok", root / name.replace(" ", "_"),
                                        args.steps, args.batch))
            print(json.dumps(rows[-1]), flush=True)
            load.append(os.getloadavg()[0])
    single, anyres = rows
    summary = {"task": "stripe direction of a fine grating over 448-672 px scenes, 64 px tower",
               "period_single_view_px": list(PERIOD), "contrast": list(CONTRAST), "mottle": MOTTLE,
               "train": args.train, "test": args.test, "steps": args.steps, "batch": args.batch,
               "signal_check": check, "systems": rows,
               "accuracy_gain_points": round(100 * (anyres["accuracy"] - single["accuracy"]), 1),
               "time_per_step_ratio": round(anyres["s_per_step"] / single["s_per_step"], 2),
               "image_tokens_ratio": round(anyres["image_tokens_median"] / single["image_tokens_median"], 2),
               # step times only compare on an otherwise idle machine: the 1-minute load before and after each system
               "machine": {"cpus": os.cpu_count(), "load_average_1min": [round(v, 2) for v in load]}}
    print(json.dumps(summary, indent=1))
    if not args.quick:
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "anyres.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines = ["| system | held-out accuracy | s / step | image tokens (median) |", "|---|---|---|---|"]
        lines += [f"| {r['system']} | {100 * r['accuracy']:.1f} % | {r['s_per_step']:.3f} | "
                  f"{r['image_tokens_median']:.0f} |" for r in rows]
        lines += ["", f"Signal check ({check['scenes']} scenes): what the grating adds to the pixels each model gets.",
                  "",
                  "| view | grating rms (grey levels) | background rms | orientation feature accuracy |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['grating_rms']:.2f} | {v['background_rms']:.2f} | "
                  f"{100 * v['orientation_feature_accuracy']:.0f} % |" for k, v in check.items() if k != "scenes"]
        (out / "anyres.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
