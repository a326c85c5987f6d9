"""The demo's compiled stage-2 step against the same step as vistune took it before 2026-12-03.

The systems are the demo-shaped model of ``train_compile.py`` (a 192-wide, 4-layer Llama under 64
visual tokens per image, batch 14, features from a cache), compiled as ``train.compile`` compiles it,
with Muon on the matrices and AdamW on the rest, as the demo's stage 2 trains, on the demo's own
stage-2 records (its rules mix of short-answer VQA and the three LLaVA-Instruct kinds, the ``v0``
template, a BPE tokenizer of 1024 trained on their text):

    before    the model's plain forward (the padding mask as the collator made it, which compiled
              eager attention rebuilds inside its softmax; logits at every position), and
              Newton-Schulz run matrix by matrix
    vistune   the training forward of ``vistune.train.speedups`` (the causal mask alone for
              right-padded batches, the LM head at the supervised positions only), and the matrices
              of one shape orthogonalised as one stack (``Muon``)

Both start from the same weights and see the same batches in the same order; the head at the
supervised rows rounds differently, so the losses are compared by their largest relative difference.
Steps are interleaved; medians are compared.
glibc's allocator setting (``runtime.training_memory``) is process-wide, so both systems run with it, as training does.

    python benchmarks/train_step.py               # writes benchmarks/results/train_step.{json,md}
    python benchmarks/train_step.py --threads 1   # as the demo's stage 2 beside its ablation
    python benchmarks/train_step.py --quick       # fewer steps, writes nothing
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_compile as tc  # noqa: E402  (its demo-shaped model, cached batches, CPU name; sets the inductor cache)
import train_throughput as tt  # noqa: E402

from vistune.demo.pipeline import DemoConfig  # noqa: E402
from vistune import runtime  # noqa: E402
from vistune.hardware import cpu_name, fast_bf16  # noqa: E402
from vistune.instruct.rules import generate_mix  # noqa: E402
from vistune.instruct.synth import make_world  # noqa: E402
from vistune.text.encode import encode_conversation  # noqa: E402
from vistune.text.templates import get_template, render as render_template  # noqa: E402
from vistune.text.tokenizer import train_bpe_tokenizer  # noqa: E402
from vistune.train.optim import Muon, MuonAdamW, muon_matrices  # noqa: E402
from vistune.train.speedups import for_training  # noqa: E402
from vistune.train.stages import compile_decoder  # noqa: E402


class MatrixByMatrixMuon(Muon):
    """vistune's Muon before the stacks: one Newton-Schulz iteration per matrix (the baseline)."""

    def _stack_key(self, p: torch.Tensor) -> tuple:
        return (id(p),)  # every matrix a stack of its own


def muon_adamw(model, muon_cls) -> MuonAdamW:
    mats = muon_matrices(model)
    learn = [p for p in model.parameters() if p.requires_grad]
    opt = MuonAdamW([{"params": [p for p in learn if id(p) in mats], "lr": 3e-3, "weight_decay": 0.0}],
                    [{"params": [p for p in learn if id(p) not in mats], "lr": 3e-4, "weight_decay": 0.0}],
                    betas=(0.9, 0.999), eps=1e-8)
    if muon_cls is not Muon:
        opt.muon = muon_cls(opt.muon.param_groups, lr=3e-3)
    return opt


def demo_records(images: int = 300) -> list[dict]:
    """Stage-2 records as the demo draws them, from a world of its own."""
    with tempfile.TemporaryDirectory() as d:
        anns = make_world(Path(d) / "world", images, seed=0)
    return generate_mix(anns, DemoConfig().instruct_mix, seed=0)


def demo_samples(records: list[dict], model, tok, n: int, seed: int) -> list[dict]:
    """n of the records, encoded as stage 2 encodes them (random pixels: the tower's features are cached)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(rng.sample(records, n)):
        enc = encode_conversation(tok, "v0", r["conversations"], image_token_id=model.image_token_id,
                                  num_image_tokens=model.config.num_image_tokens, record_id=i)
        out.append({"id": str(i), "input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels),
                    "pixel_values": torch.randn(1, 3, tt.SIZE["image"], tt.SIZE["image"], generator=gen)})
    return out


def step_fn(model, opt, autocast, losses: list):
    def step(batch):
        with autocast():
            out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.training_memory()
    rounds, n_batches = (6, 4) if args.quick else (25, 8)
    device = torch.device("cpu")
    bf16 = fast_bf16(device)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    records = demo_records()
    v0 = get_template("v0")  # the demo's tokenizer reads its records as the template renders them
    texts = [render_template(v0, [{**t, "value": t["value"].replace("<image>", "").strip()} for t in r["conversations"]],
                    eos="</s>", bos="<s>").text for r in records]
    before, tok = tc.demo_shaped_model(train_bpe_tokenizer(texts, vocab_size=1024))
    after = copy.deepcopy(before)
    for m in (before, after):
        tt.set_stage(m, 2)
        compile_decoder(m, device)
    batches = tc.cached_batches(before, tok, n_batches,
                                lambda model, tok, n, seed: demo_samples(records, model, tok, n, seed))
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    losses = {"before": [], "vistune": []}
    systems = {
        "before": tt.System("before", step_fn(before, muon_adamw(before, MatrixByMatrixMuon), autocast,
                                              losses["before"]), batches, tokens),
        "vistune": tt.System("vistune", step_fn(for_training(after), muon_adamw(after, Muon), autocast,
                                                losses["vistune"]), batches, tokens),
    }
    for s in systems.values():
        s.run_one(record=False)  # the compile
    tt.time_all(systems, warmup=n_batches, rounds=rounds)

    res = {k: s.summary() for k, s in systems.items()}
    med = {k: r["step_s_median"] for k, r in res.items()}
    out = {
        "benchmark": "train_step", "device": cpu_name(), "threads": torch.get_num_threads(),
        "precision": "bf16" if bf16 else "fp32", "batch": tc.BATCH, "systems": res,
        "speedup_over_before": round(med["before"] / med["vistune"], 3), "steps_compared": len(losses["vistune"]),
        "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses["vistune"], losses["before"])),
    }
    table = render(out)
    print(table)
    if not args.quick:
        tc.save_results("train_step", out, table)
    return 0


def render(out: dict) -> str:
    lines = tc.systems_table("Compiled stage-2 step with Muon", out)
    lines += ["", f"vistune vs before: **{out['speedup_over_before']:.2f}x** per step; losses within "
              f"{out['loss_rel_diff']:.1e} (relative) over {out['steps_compared']} steps"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
