"""The demo's compiled stage-2 step against the same step as vistune took it before 2026-12-03.

The systems are the demo-shaped model of ``train_compile.py`` (a 192-wide, 4-layer Llama under 64
visual tokens per image, batch 14, features from a cache), compiled as ``train.compile`` compiles it,
with Muon on the matrices and AdamW on the rest, as the demo's stage 2 trains, on the demo's own
stage-2 records (its rules mix of short-answer VQA and the three LLaVA-Instruct kinds, the ``v0``
template, a BPE tokenizer of 1024 trained on their text):

    before    the padding mask passed to the LM as the collator made it (compiled eager attention
              rebuilds it inside its softmax), and Newton-Schulz run matrix by matrix
    full stack  the causal mask alone for right-padded batches (``causal_training_mask``) and the
              matrices of one shape orthogonalised as one stack (``Muon``): vistune until 2026-12-04
    vistune   the same, and the LM's last layer computed only at the positions the loss reads
              (``vistune.model.last_layer``)

All start from the same weights and see the same batches in the same order. ``before`` and ``full
stack`` should give the same losses to the last digit (``same_losses``); the last-layer path rounds
differently and is compared by its largest relative loss difference. Steps are interleaved; medians
are compared.
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
from vistune.model import last_layer, vlm  # noqa: E402
from vistune.train.optim import Muon, MuonAdamW, muon_matrices  # noqa: E402
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


def step_fn(model, opt, autocast, losses: list, padding_mask: bool, last_rows: bool):
    def step(batch):
        keep, keep_supports = vlm.causal_training_mask, last_layer.supports
        if padding_mask:
            vlm.causal_training_mask = lambda mask, impl, dtype: mask  # the mask as the collator made it
        if not last_rows:
            last_layer.supports = lambda decoder, seq_len: False  # the whole stack at every position
        try:
            with autocast():
                out = model(**batch)
        finally:
            vlm.causal_training_mask, last_layer.supports = keep, keep_supports
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
    full, after = copy.deepcopy(before), copy.deepcopy(before)
    for m in (before, full, after):
        tt.set_stage(m, 2)
        compile_decoder(m, device)
    batches = tc.cached_batches(before, tok, n_batches,
                                lambda model, tok, n, seed: demo_samples(records, model, tok, n, seed))
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    losses = {"before": [], "full stack": [], "vistune": []}
    systems = {
        "before": tt.System("before", step_fn(before, muon_adamw(before, MatrixByMatrixMuon), autocast,
                                              losses["before"], padding_mask=True, last_rows=False), batches, tokens),
        "full stack": tt.System("full stack", step_fn(full, muon_adamw(full, Muon), autocast, losses["full stack"],
                                                      padding_mask=False, last_rows=False), batches, tokens),
        "vistune": tt.System("vistune", step_fn(after, muon_adamw(after, Muon), autocast,
                                                losses["vistune"], padding_mask=False, last_rows=True), batches, tokens),
    }
    for s in systems.values():
        s.run_one(record=False)  # the compile
    tt.time_all(systems, warmup=n_batches, rounds=rounds)

    res = {k: s.summary() for k, s in systems.items()}
    med = {k: r["step_s_median"] for k, r in res.items()}
    out = {
        "benchmark": "train_step", "device": cpu_name(), "threads": torch.get_num_threads(),
        "precision": "bf16" if bf16 else "fp32", "batch": tc.BATCH, "systems": res,
        "speedup_over_before": round(med["before"] / med["vistune"], 3),
        "speedup_last_layer": round(med["full stack"] / med["vistune"], 3),
        "same_losses": losses["before"] == losses["full stack"], "steps_compared": len(losses["vistune"]),
        "last_layer_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses["vistune"], losses["full stack"])),
    }
    table = render(out)
    print(table)
    if not args.quick:
        tc.save_results("train_step", out, table)
    return 0


def render(out: dict) -> str:
    lines = tc.systems_table("Compiled stage-2 step with Muon", out)
    same = "the same losses" if out["same_losses"] else "**different losses**"
    lines += ["", f"vistune vs before: **{out['speedup_over_before']:.2f}x** per step; full stack vs before: "
              f"{same} over {out['steps_compared']} steps",
              f"the last layer at the supervised rows (vistune vs full stack): **{out['speedup_last_layer']:.2f}x** "
              f"per step, losses within {out['last_layer_loss_rel_diff']:.1e} (relative)"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
