"""The demo's compiled stage-2 step against the same step as vistune took it before 2026-12-03.

Both systems are the demo-shaped model of ``train_compile.py`` (a 192-wide, 4-layer Llama under 64
visual tokens per image, batch 14, features from a cache), compiled as ``train.compile`` compiles it,
with Muon on the matrices and AdamW on the rest, as the demo's stage 2 trains:

    before    the padding mask passed to the LM as the collator made it (compiled eager attention
              rebuilds it inside its softmax), and Newton-Schulz run matrix by matrix
    vistune   the causal mask alone for right-padded batches (``causal_training_mask``) and the
              matrices of one shape orthogonalised as one stack (``Muon``)

Both start from the same weights and see the same batches in the same order, so their losses should
match to the last digit (reported as ``same_losses``). Steps are interleaved; medians are compared.
glibc's ``keep_freed_memory`` is process-wide, so both systems run with it, as training does.

    python benchmarks/train_step.py               # writes benchmarks/results/train_step.{json,md}
    python benchmarks/train_step.py --threads 1   # as the demo's stage 2 beside its ablation
    python benchmarks/train_step.py --quick       # fewer steps, writes nothing
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_compile as tc  # noqa: E402  (its demo-shaped model, cached batches, CPU name; sets the inductor cache)
import train_throughput as tt  # noqa: E402

from vistune.hardware import cpu_name, fast_bf16, keep_freed_memory  # noqa: E402
from vistune.model import vlm  # noqa: E402
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


def step_fn(model, opt, autocast, losses: list, padding_mask: bool):
    def step(batch):
        keep = vlm.causal_training_mask
        if padding_mask:
            vlm.causal_training_mask = lambda mask, impl, dtype: mask  # the mask as the collator made it
        try:
            with autocast():
                out = model(**batch)
        finally:
            vlm.causal_training_mask = keep
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
    keep_freed_memory()
    rounds, n_batches = (6, 4) if args.quick else (25, 8)
    device = torch.device("cpu")
    bf16 = fast_bf16(device)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    tok = tt.make_tokenizer()
    before, tok = tc.demo_shaped_model(tok)
    after = copy.deepcopy(before)
    for m in (before, after):
        tt.set_stage(m, 2)
        compile_decoder(m, device)
    batches = tc.cached_batches(before, tok, n_batches)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    losses = {"before": [], "vistune": []}
    systems = {
        "before": tt.System("before", step_fn(before, muon_adamw(before, MatrixByMatrixMuon), autocast,
                                              losses["before"], padding_mask=True), batches, tokens),
        "vistune": tt.System("vistune", step_fn(after, muon_adamw(after, Muon), autocast,
                                                losses["vistune"], padding_mask=False), batches, tokens),
    }
    for s in systems.values():
        s.run_one(record=False)  # the compile
    tt.time_all(systems, warmup=n_batches, rounds=rounds)

    res = {k: s.summary() for k, s in systems.items()}
    out = {
        "benchmark": "train_step", "device": cpu_name(), "threads": torch.get_num_threads(),
        "precision": "bf16" if bf16 else "fp32", "batch": tc.BATCH, "systems": res,
        "speedup_over_before": round(res["before"]["step_s_median"] / res["vistune"]["step_s_median"], 3),
        "same_losses": losses["before"] == losses["vistune"], "steps_compared": len(losses["vistune"]),
    }
    table = render(out)
    print(table)
    if not args.quick:
        tc.save_results("train_step", out, table)
    return 0


def render(out: dict) -> str:
    lines = tc.systems_table("Compiled stage-2 step with Muon", out)
    same = "the same losses" if out["same_losses"] else "**different losses**"
    lines += ["", f"vistune vs before: **{out['speedup_over_before']:.2f}x** per step, "
              f"{same} over {out['steps_compared']} steps"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
