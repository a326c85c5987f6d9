"""Stage-2 step time with ``train.compile`` against the same model uncompiled.

The model has the shape of the demo's stage 2 (a 192-wide, 4-layer Llama with 6 heads
under 64 visual tokens per image, batch 14), tower frozen and read from precomputed
features as the demo's feature cache gives them. Both systems hold the same weights
and see the same batches (a LLaVA-like mix of short answers and long descriptions, so
the length varies from batch to batch as it does in training):

    eager      vistune as it trains by default (SDPA attention)
    compiled   vistune.train.stages.compile_decoder: the decoder under torch.compile,
               dynamic shapes, eager attention on a CPU (what train.compile does)

Steps are interleaved (round robin) so that load drifts hit both alike; medians are
compared. The compile itself is timed apart (the first compiled step minus an eager one),
with an empty inductor cache of its own, as a fresh machine pays it.

    python benchmarks/train_compile.py               # writes benchmarks/results/train_compile.{json,md}
    python benchmarks/train_compile.py --threads 1   # torch threads (default: torch's own choice)
    python benchmarks/train_compile.py --quick       # fewer steps, writes nothing
    python benchmarks/train_compile.py --precision fp32   # as a CPU without native bf16 trains
                                                          # (writes train_compile-fp32.{json,md})
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vistune-bench-inductor-")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (its tokenizer, samples and round-robin timer)

from vistune.data.collate import PadCollator  # noqa: E402
from vistune.hardware import cpu_name, fast_bf16  # noqa: E402
from vistune.model.build import build_vlm  # noqa: E402
from vistune.model.tiny import tiny_text_config, tiny_vision_config  # noqa: E402
from vistune.train.stages import compile_decoder  # noqa: E402

BATCH = 14
RESULTS = Path(__file__).resolve().parent / "results"


def demo_shaped_model(tok, layers: int = 4):
    torch.manual_seed(0)
    vision = tiny_vision_config("clip", image_size=64, patch_size=8, hidden_size=96, layers=2, heads=4)
    text = tiny_text_config("llama", vocab_size=len(tok) + 8, hidden_size=192, layers=layers, heads=6, max_positions=512)
    text.update(intermediate_size=576, num_key_value_heads=6)
    model, tok = build_vlm(vision, text, tok, projector_type="mlp2x_gelu", template="vicuna_v1", max_length=512)
    return model, tok


def cached_batches(model, tok, n: int, make_samples=tt.make_samples) -> list[dict]:
    """Padded batches with the tower's features in place of pixels (the demo's feature cache)."""
    out = []
    for k in range(n):
        samples = make_samples(model, tok, BATCH, seed=k)
        b = PadCollator(tok.pad_token_id)(samples)
        with torch.no_grad():
            feats = model.vision(b["pixel_values"])
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"],
                    "vision_features": feats})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 autocast where the CPU has native bf16 (as the demo), else fp32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, n_batches = (6, 4) if args.quick else (30, 8)
    device = torch.device("cpu")
    bf16 = fast_bf16(device) if args.precision == "auto" else args.precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    tok = tt.make_tokenizer()
    eager, tok = demo_shaped_model(tok)
    compiled = copy.deepcopy(eager)
    # Tower frozen, projector and LLM learning, AdamW: the same step train_throughput.py times.
    opt_eager, opt_compiled = tt.set_stage(eager, 2), tt.set_stage(compiled, 2)
    batches = cached_batches(eager, tok, n_batches)
    tokens = [int(b["attention_mask"].sum()) for b in batches]

    with torch.no_grad():
        ref = eager(**batches[0]).loss
    replaced = compile_decoder(compiled, device)
    t0 = time.perf_counter()
    with torch.no_grad():
        got = compiled(**batches[0]).loss
    # Same weights, same batch: the same loss (eager attention vs SDPA, fused kernels) before timing.
    assert torch.allclose(ref, got, rtol=1e-4), (float(ref), float(got))

    systems = {"eager": tt.System("eager", tt.vistune_step(eager, opt_eager, autocast), batches, tokens),
               "compiled": tt.System("compiled", tt.vistune_step(compiled, opt_compiled, autocast), batches, tokens)}
    # The compile: the check's forward and the first training step (forward and backward graphs),
    # against an eager step.
    systems["compiled"].run_one(record=False)
    compile_first = time.perf_counter() - t0
    t_eager = time.perf_counter()
    systems["eager"].run_one(record=False)
    eager_first = time.perf_counter() - t_eager
    tt.time_all(systems, warmup=n_batches, rounds=rounds)  # every batch length seen once before timing

    res = {k: s.summary() for k, s in systems.items()}
    ratio = res["eager"]["step_s_median"] / res["compiled"]["step_s_median"]
    saved = res["eager"]["step_s_median"] - res["compiled"]["step_s_median"]
    compile_s = compile_first - eager_first
    out = {
        "benchmark": "train_compile", "device": cpu_name(),
        "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32", "batch": BATCH,
        "attention_replaced": replaced, "systems": res,
        "speedup_compiled_over_eager": round(ratio, 3),
        "compile_s": round(compile_s, 1),
        "break_even_steps": round(compile_s / saved) if saved > 0 else None,  # None: never repaid
    }
    table = render(out)
    print(table)
    if not args.quick:
        save_results("train_compile" if args.precision == "auto" else f"train_compile-{args.precision}", out, table)
    return 0


def save_results(name: str, out: dict, table: str) -> None:
    """results/NAME.json and results/NAME.md."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")


def systems_table(title: str, out: dict) -> list[str]:
    """The header line and the per-system table of a demo-shaped step benchmark, as Markdown lines."""
    lines = [f"{title}, demo-shaped model, batch {out['batch']}, {out['precision']}, "
             f"{out['threads']} thread(s), {out['device']}", "",
             "| system | step (median) | tokens / s |", "|---|---|---|"]
    for name, r in out["systems"].items():
        lines.append(f"| {name} | {r['step_s_median']:.3f} s | {r['tokens_per_s']:.0f} |")
    return lines


def render(out: dict) -> str:
    lines = systems_table("Stage-2 step", out)
    lines += ["", f"compiled vs eager: **{out['speedup_compiled_over_eager']:.2f}x** per step; the compile took "
              f"{out['compile_s']:.0f} s, " + (f"repaid after {out['break_even_steps']} steps"
                                               if out["break_even_steps"] is not None else "never repaid")]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
