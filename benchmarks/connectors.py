"""A Q-Former connector with 8 queries against the MLP projector's full grid, on the tiny data.

Both models are the same tiny ViT (64 px images, 8 px patches: a grid of 64 features) and
2-layer Llama, trained from scratch through both stages with the same data, steps and
seed. They differ in what sits between tower and LLM:

    mlp        mlp2x_gelu on every patch feature: 64 visual tokens per image (LLaVA)
    qformer    a 2-layer Q-Former with 8 learned queries, then a linear layer: 8 tokens (MiniGPT-4's shape)

Held out: the last quarter of the images, never trained on; each is asked its shape's colour and
its kind, answered greedily; an answer is right when it names the true word. Time per step is
the median of stage 2's optimizer steps (metrics.jsonl), on this machine's CPU.

    python benchmarks/connectors.py            # 20 epochs per stage; writes benchmarks/results/connectors.{json,md}
    python benchmarks/connectors.py --quick    # fewer epochs, writes nothing
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vistune.hardware import cpu_name
from vistune.infer.engine import Engine
from vistune.infer.types import GenerationConfig, Prompt
from vistune.model.checkpoint import load
from vistune.model.tiny import tiny_text_config, tiny_vision_config
from vistune.train import run
from vistune.train.config import RunConfig
from vistune.instruct.synth import COLORS, SHAPES
from vistune.instruct.tiny_data import make_tiny_data

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = {
    "mlp": {"projector": "mlp2x_gelu"},
    "qformer": {"projector": "linear", "connector": "qformer", "num_queries": 8,
                "connector_options": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "intermediate_size": 128}},
}


def split(data: dict, held: set[str], out: Path) -> dict:
    """The data's records without the held-out images (text-only records stay)."""
    paths = {}
    for part in ("pretrain", "instruct"):
        rows = [json.loads(x) for x in Path(data[part]).read_text().splitlines()]
        keep = [r for r in rows if r.get("image") not in held]
        paths[part] = out / f"{part}.jsonl"
        paths[part].write_text("".join(json.dumps(r) + "\n" for r in keep))
    return paths


def train(name: str, data: dict, parts: dict, out: Path, epochs: int) -> tuple[Path, list[float]]:
    model = {"vision": tiny_vision_config("clip", image_size=64, patch_size=8, hidden_size=32),
             "llm": tiny_text_config("llama", vocab_size=512), "tokenizer": str(data["tokenizer"]),
             "vision_feature_select": "patch", **SYSTEMS[name]}
    common = {"epochs": epochs, "lr": 2e-3, "batch_size": 8, "progress": False, "precision": "fp32",
              "warmup_ratio": 0.03, "seed": 0}
    s1 = RunConfig.from_dict({
        "output_dir": str(out / f"{name}-s1"), "model": model,
        "data": {"train": str(parts["pretrain"]), "images": str(data["images"]), "template": "plain",
                 "max_length": 128},
        "train": {"vision": "full", "projector": "full", "llm": "full", **common}})
    r1 = run(s1)
    s2 = RunConfig.from_dict({
        "output_dir": str(out / f"{name}-s2"), "model": {"from": str(r1.model_dir)},
        "data": {"train": str(parts["instruct"]), "images": str(data["images"]), "template": "v0",
                 "max_length": 320},
        "train": {"vision": "frozen", "projector": "full", "llm": "full", **{**common, "lr": 1e-3}}})
    r2 = run(s2)
    times = [json.loads(x)["time"] for x in r2.metrics_path.read_text().splitlines()]
    return r2.model_dir, [b - a for a, b in zip(times, times[1:])]


def held_out_accuracy(model_dir: Path, images: Path, held: list[tuple[str, str, str]]) -> tuple[float, int, list]:
    from PIL import Image

    engine = Engine(load(model_dir))
    prompts, truth = [], []
    for file, color, shape in held:
        img = Image.open(images / file).convert("RGB")
        prompts += [Prompt.ask("<image>\nWhat color is the shape?", [img]),
                    Prompt.ask("<image>\nWhat shape is in the image?", [img])]
        truth += [color, shape]
    answers = []
    for i in range(0, len(prompts), 16):
        answers += [c.text.lower() for c in engine.generate(prompts[i:i + 16], GenerationConfig(max_new_tokens=12))]
    right = sum(t in a for t, a in zip(truth, answers))
    return right / len(truth), engine.model.config.num_image_tokens, answers[:4]


def truth_of(data: dict) -> dict[str, tuple[str, str]]:
    """{image: (colour, shape)} from the captions ("a red circle on the left.")."""
    out = {}
    for line in Path(data["pretrain"]).read_text().splitlines():
        r = json.loads(line)
        words = r["conversations"][1]["value"].split()
        color = next(w for w in words if w in COLORS)
        shape = next(w for w in words if w in SHAPES)
        out[r["image"]] = (color, shape)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=144)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    epochs = 2 if args.quick else args.epochs
    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vistune-bench-connectors-") as tmp:
        tmp = Path(tmp)
        data = make_tiny_data(tmp / "data", n_images=args.images, seed=0, image_size=64)
        truth = truth_of(data)
        files = sorted(truth)
        held_files = files[len(files) * 3 // 4:]
        parts = split(data, set(held_files), tmp)
        held = [(f, *truth[f]) for f in held_files]
        rows = {}
        for name in SYSTEMS:
            model_dir, steps = train(name, data, parts, tmp / "runs", epochs)
            acc, tokens, sample = held_out_accuracy(model_dir, Path(data["images"]), held)
            rows[name] = {"held_out_accuracy": round(acc, 4), "visual_tokens_per_image": tokens, "sample": sample,
                          "median_step_s": round(statistics.median(steps), 4), "stage2_steps": len(steps) + 1}
            print(name, rows[name], flush=True)
    result = {"benchmark": "connectors", "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "images": args.images, "held_out_images": len(held), "questions": 2 * len(held), "epochs": epochs,
              "systems": rows, "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "connectors.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = ["| connector | visual tokens / image | held-out accuracy | median stage-2 step (s) |",
                 "|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['visual_tokens_per_image']} | {r['held_out_accuracy']:.1%} | "
                         f"{r['median_step_s']:.3f} |")
        (RESULTS / "connectors.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
