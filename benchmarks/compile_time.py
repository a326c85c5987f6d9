"""The compile of a training run: the LM's layers compiled one by one (regional) against its whole stack.

``train.compile`` compiles each decoder layer on its own; layers of one class share a graph,
so the compile should not grow with depth. The baseline is how vistune compiled before
2026-12-05: the decoder's whole stack under one ``torch.compile``. (The committed results
were taken when the loss path also ran a compiled last layer at the supervised rows, since removed.)

Each system runs in a process of its own with an empty inductor cache, as on a fresh machine:
the demo-shaped model (192 wide, 6 heads, 64 visual tokens per image, batch 14, features from
a cache, Muon) at the demo's depth of 4 layers and at 16, on the demo's own stage-2 records.
The first step holds the compile. The running speed is timed apart, both systems in one process
with their steps interleaved (the whole stack's kernels found in its cache), so that load drifts hit
both alike.

    python benchmarks/compile_time.py                # writes benchmarks/results/compile_time.{json,md}
    python benchmarks/compile_time.py --threads 1    # as the demo's stage 2 beside its ablation
    python benchmarks/compile_time.py --quick        # 4 layers only, fewer steps, writes nothing
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = ("whole stack", "regional")


def _setup(layers: int, threads: int):
    """The demo-shaped model at ``layers`` deep, its records' batches and a step factory, in this process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    import train_compile as tc  # noqa: F401  (its import points inductor at an empty cache unless one is set)
    import train_step as ts
    import train_throughput as tt

    from vistune import runtime
    from vistune.text.templates import get_template, render as render_template
    from vistune.text.tokenizer import train_bpe_tokenizer

    if threads:
        torch.set_num_threads(threads)
    runtime.training_memory()
    records = ts.demo_records()
    v0 = get_template("v0")
    texts = [render_template(v0, [{**t, "value": t["value"].replace("<image>", "").strip()} for t in r["conversations"]],
                             eos="</s>", bos="<s>").text for r in records]
    model, tok = tc.demo_shaped_model(train_bpe_tokenizer(texts, vocab_size=1024), layers=layers)
    tt.set_stage(model, 2)
    batches = tc.cached_batches(model, tok, 8, lambda model, tok, n, seed: ts.demo_samples(records, model, tok, n, seed))
    return model, batches


def _compiled_step(system: str, model, losses: list):
    """Compile ``model`` as ``system`` does and return its training step (Muon, bf16 autocast)."""
    import torch
    import train_step as ts

    from vistune.train import stages
    from vistune.train.optim import Muon
    from vistune.train.speedups import for_training

    if system == "whole stack":
        keep = stages.repeated_layers
        stages.repeated_layers = lambda decoder: None  # no list of layers found: the decoder compiled whole
        try:
            stages.compile_decoder(model, torch.device("cpu"))
        finally:
            stages.repeated_layers = keep
    else:
        stages.compile_decoder(model, torch.device("cpu"))
    return ts.step_fn(for_training(model), ts.muon_adamw(model, Muon),
                      lambda: torch.autocast("cpu", dtype=torch.bfloat16), losses)


def compile_once(system: str, layers: int, threads: int) -> dict:
    """The first two steps of one system: the first holds the compile (this process's cache is empty)."""
    import torch

    model, batches = _setup(layers, threads)
    losses: list[float] = []
    step = _compiled_step(system, model, losses)
    times = []
    for b in batches[:2]:
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
    return {"system": system, "layers": layers, "first_step_s": round(times[0], 1), "second_step_s": round(times[1], 2),
            "first_loss": losses[0], "threads": torch.get_num_threads()}


def steps_interleaved(layers: int, threads: int, rounds: int) -> dict:
    """Both systems from the same weights on the same batches, steps interleaved: medians per system."""
    import copy

    import train_throughput as tt

    model, batches = _setup(layers, threads)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    systems = {}
    for system in SYSTEMS:
        step = _compiled_step(system, copy.deepcopy(model), [])
        systems[system] = tt.System(system, lambda b, step=step: step(b), batches, tokens)
        systems[system].run_one(record=False)  # the compile
    tt.time_all(systems, warmup=len(batches), rounds=rounds)
    return {k: s.summary()["step_s_median"] for k, s in systems.items()}


def _child(args: list[str], cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile-once", nargs=2, metavar=("SYSTEM", "LAYERS"), help=argparse.SUPPRESS)
    ap.add_argument("--steps-interleaved", type=int, metavar="LAYERS", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_once:
        print(json.dumps(compile_once(args.compile_once[0], int(args.compile_once[1]), args.threads)))
        return 0
    if args.steps_interleaved:
        print(json.dumps(steps_interleaved(args.steps_interleaved, args.threads, args.rounds)))
        return 0

    depths, rounds = ((4,), 6) if args.quick else ((4, 16), 20)
    rows, steps = [], {}
    for layers in depths:
        caches = {}
        for system in SYSTEMS:
            # A process and an empty cache each, as on a fresh machine: nothing one compiled helps the other.
            caches[system] = tempfile.mkdtemp(prefix="vistune-bench-inductor-")
            rows.append(_child(["--compile-once", system, str(layers), "--threads", str(args.threads)], caches[system]))
            print(f"{layers} layers, {system}: first step {rows[-1]['first_step_s']} s", flush=True)
        # The running speed in one process, interleaved; the whole stack's compile is found in its cache.
        steps[layers] = _child(["--steps-interleaved", str(layers), "--threads", str(args.threads),
                                "--rounds", str(rounds)], caches["whole stack"])
        print(f"{layers} layers, steps: {steps[layers]}", flush=True)

    from vistune.hardware import cpu_name
    out = {"benchmark": "compile_time", "device": cpu_name(), "threads": rows[0]["threads"], "precision": "bf16",
           "batch": 14, "runs": [{**{k: v for k, v in r.items() if k != "first_loss"},
                                   "step_s_median": steps[r["layers"]][r["system"]]} for r in rows], "by_depth": {}}
    for layers in depths:
        whole, regional = (next(r for r in rows if r["layers"] == layers and r["system"] == s) for s in SYSTEMS)
        out["by_depth"][str(layers)] = {
            "compile_speedup": round(whole["first_step_s"] / regional["first_step_s"], 2),
            "step_ratio": round(steps[layers]["whole stack"] / steps[layers]["regional"], 3),
            "first_loss_rel_diff": abs(whole["first_loss"] - regional["first_loss"]) / abs(whole["first_loss"]),
        }
    table = render(out)
    print(table)
    if not args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import train_compile as tc
        tc.save_results("compile_time", out, table)
    return 0


def render(out: dict) -> str:
    lines = [f"The compile of a training run (first step, empty inductor cache), demo-shaped model, batch "
             f"{out['batch']}, {out['precision']}, {out['threads']} thread(s), {out['device']}", "",
             "| layers | system | first step (compile) | step after it (median) |", "|---|---|---|---|"]
    for r in out["runs"]:
        lines.append(f"| {r['layers']} | {r['system']} | {r['first_step_s']:.1f} s | {r['step_s_median']:.3f} s |")
    lines.append("")
    for layers, d in out["by_depth"].items():
        lines.append(f"{layers} layers: the regional compile **{d['compile_speedup']:.2f}x** as fast as the whole "
                     f"stack's; steps {d['step_ratio']:.2f}x (interleaved in one process); first losses within "
                     f"{d['first_loss_rel_diff']:.1e} (relative)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
