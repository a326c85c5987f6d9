"""Each training speed-up on and off, on the llava-v1.5-7b shape scaled as train_throughput.py scales it.

One stage-2 step (forward, backward, AdamW; tower frozen, projector + LLM learning), fp32, batch 8 of
LLaVA-like samples (``train_throughput.make_samples``: ~60 % short VQA answers, ~40 % long
descriptions) on the ``llava-v1.5-7b`` scaled shape (CLIP 6 x 32, layer -2, 256 image tokens, under
Llama 8 x 128, SDPA attention). The systems add the speed-ups of ``vistune.train.speedups`` one at
a time:

    plain                the model's own forward (model/vlm.py), the batch's padding mask
    causal mask alone    the same, the right-padded batch without its mask
    vistune              ``for_training``: the causal mask alone and the LM head at the
                         supervised positions only (what the trainer runs)
    vistune, padding mask   the same, the padding mask kept (``right_padded`` patched to say no)

Each speed-up's gain is taken with the other one on, as training runs it (``gains``), and the
mask's also on the plain forward (``gains_on_plain``).

All start from the same weights and see the same batches; steps are interleaved and medians
compared, of wall time and of the process's CPU time (steadier on a shared machine).
Speed-ups that gained under 5 % here were removed; their measurement is kept in the JSON
(``removed``), taken with this script as it was at the commit named there.

    python benchmarks/speedups.py --threads 1   # writes benchmarks/results/speedups.{json,md}
    python benchmarks/speedups.py --quick       # fewer steps, writes nothing
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the shapes, tokenizer, samples, System)

from vistune.data.collate import PadCollator  # noqa: E402
from vistune.train import speedups  # noqa: E402
from vistune.train.speedups import for_training  # noqa: E402

SHAPE = "llava-v1.5-7b"
SYSTEMS = ("plain", "causal mask alone", "vistune", "vistune, padding mask")
# speed-up -> (system without it, system with it)
GAINS = {"causal mask alone": ("vistune, padding mask", "vistune"),
         "loss at the supervised positions": ("causal mask alone", "vistune")}
GAINS_ON_PLAIN = {"causal mask alone": ("plain", "causal mask alone")}


class CPUSystem(tt.System):
    """A System that also records the process's CPU time per step."""

    def __init__(self, *a):
        super().__init__(*a)
        self.cpu: list[float] = []

    def run_one(self, record: bool) -> None:
        c0 = time.process_time()
        super().run_one(record)
        if record:
            self.cpu.append(time.process_time() - c0)

    def summary(self) -> dict:
        return {**super().summary(), "cpu_s_median": round(statistics.median(self.cpu), 4)}


def step_fn(model, opt, losses: list, system: str):
    forward = for_training(model) if system.startswith("vistune") else model

    def step(batch):
        if system == "causal mask alone":
            batch = {**batch, "attention_mask": None}  # right padding: the causal mask is all it needs
        keep = speedups.right_padded
        if system == "vistune, padding mask":
            speedups.right_padded = lambda mask: False
        try:
            out = forward(**batch)
        finally:
            speedups.right_padded = keep
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per system")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, n_batches = (3, 2) if args.quick else (args.steps, 4)
    torch.manual_seed(0)
    tok = tt.make_tokenizer()
    base, tok = tt.make_stage1_model(tok, tt.STAGE1_SHAPES[SHAPE]["scaled"])
    batches = [tt.model_batch(PadCollator(tok.pad_token_id)(tt.make_samples(base, tok, tt.BATCH, seed=k)))
               for k in range(n_batches)]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    losses: dict[str, list[float]] = {}
    systems = {}
    for name in SYSTEMS:
        m = copy.deepcopy(base)
        opt = tt.set_stage(m, 2)
        losses[name] = []
        systems[name] = CPUSystem(name, step_fn(m, opt, losses[name], name), batches, tokens)
    tt.time_all(systems, warmup=2, rounds=rounds)
    res = {k: s.summary() for k, s in systems.items()}
    def gains(pairs: dict) -> dict:
        return {k: {"wall": round(res[off]["step_s_median"] / res[on]["step_s_median"], 3),
                    "cpu": round(res[off]["cpu_s_median"] / res[on]["cpu_s_median"], 3)}
                for k, (off, on) in pairs.items()}

    ref = losses["plain"]
    out = {"benchmark": "speedups", "shape": SHAPE, "device": tt.device_name(), "torch": torch.__version__,
           "precision": "fp32", "batch": tt.BATCH, "padded_shape": list(batches[0]["input_ids"].shape),
           "supervised_fraction": round(sum(int((b["labels"] != -100).sum()) for b in batches)
                                        / sum(b["labels"].numel() for b in batches), 3),
           "systems": res, "gains": gains(GAINS), "gains_on_plain": gains(GAINS_ON_PLAIN),
           "loss_rel_diff": {k: max(abs(a - b) / abs(b) for a, b in zip(v, ref)) for k, v in losses.items()},
           "command": "python benchmarks/speedups.py" + (f" --threads {args.threads}" if args.threads else ""),
           # the removed speed-ups' measurement, taken before they went, stays in the results
           "removed": _previous().get("removed")}
    table = render(out)
    print(table)
    if not args.quick:
        tt.RESULTS.mkdir(parents=True, exist_ok=True)
        (tt.RESULTS / "speedups.json").write_text(json.dumps(out, indent=2) + "\n")
        (tt.RESULTS / "speedups.md").write_text(table)
    return 0


def _previous() -> dict:
    path = tt.RESULTS / "speedups.json"
    return json.loads(path.read_text()) if path.exists() else {}


def render(out: dict) -> str:
    lines = [f"# Training speed-ups on and off ({out['shape']} scaled, {out['device']}, {out['precision']}, "
             f"batch {out['batch']}, padded {out['padded_shape']})", "",
             "| system | step (s) | CPU per step (s) | largest relative loss difference |", "|---|---|---|---|"]
    for name, r in out["systems"].items():
        lines.append(f"| {name} | {r['step_s_median']:.3f} | {r['cpu_s_median']:.3f} | "
                     f"{out['loss_rel_diff'][name]:.1e} |")
    lines += ["", "| speed-up | gain (wall) | gain (CPU) |", "|---|---|---|"]
    lines += [f"| {k} | {g['wall']:.3f}x | {g['cpu']:.3f}x |" for k, g in out["gains"].items()]
    lines += [f"| {k}, on the plain forward | {g['wall']:.3f}x | {g['cpu']:.3f}x |"
              for k, g in out["gains_on_plain"].items()]
    r = out["removed"]
    if not r:
        return "\n".join(lines) + "\n"
    lines += ["", f"Removed (gained under 5 %; measured at commit {r['commit']}, {r['device']}):", "",
              "| speed-up | gain (wall) | gain (CPU) |", "|---|---|---|"]
    lines += [f"| {k} | {g['wall']:.3f}x | {g['cpu']:.3f}x |" for k, g in r["gains"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
