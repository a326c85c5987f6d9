"""What the demo picks from the machine it runs on, why, and how long it should take there.

Only the precision (and with it the compile) follows the CPU; the recipe (data, steps,
batch, rates) is the same everywhere, so every machine trains the same model. Each choice
is printed in one line before any work starts, with an estimate of the run's time from a
short timing probe of a stage-2 step.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .. import runtime
from ..hardware import bf16_support, describe_machine
from ..train.optim import Muon, muon_matrices, orthogonalization_dtype
from ..train.precision import autocast
from .foundation import resolve_compile, resolve_precision
from .side import split_threads

# The demo's 600 s budget was set on CPUs that multiply bf16 natively; elsewhere the same
# recipe takes what the hardware needs, and the time is reported, not judged.
TIME_TARGET_HARDWARE = "CPUs with AVX512-BF16 or AMX"

# Whole-run seconds per probed stage-2 step and stage-2 step, fitted to a full demo run (stage 0, the
# evaluation and the side-by-side ablation included): the estimate is rough, not a promise.
RUN_PER_PROBE = 1.2

PROBE_TOKENS = 192  # a stage-2 sample's typical length: 64 visual tokens and the text of a short answer


@dataclass
class MachinePlan:
    precision: str
    precision_why: str
    compiled: bool
    compile_why: str
    orthogonalize_dtype: str
    orthogonalize_why: str
    main_threads: int
    side_threads: int
    time_target_applies: bool
    time_target_why: str
    probe_step_s: float | None = None
    estimate_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _precision_why(asked: str) -> str:
    return "set, not auto" if asked != "auto" else f"auto: {bf16_support()[1]}"


def _compile_why(setting: str, precision: str, compiled: bool) -> str:
    if setting != "auto":
        return "set, not auto"
    if compiled:
        return "auto: bf16, and a C++ compiler is here"
    if precision != "bf16":
        return "auto: an fp32 step of this size gains nothing from torch.compile"
    return "auto: no C++ compiler or Python headers for torch.compile's CPU kernels"


def plan(precision: str, compile_setting: str, threads: int, side_by_side: bool, ablations: bool) -> MachinePlan:
    """Every choice the demo makes from this machine, before it runs anything."""
    prec = resolve_precision(precision)
    compiled = resolve_compile(compile_setting, prec)
    ortho, ortho_why = orthogonalization_dtype(torch.device("cpu"))
    main, side = split_threads(threads) if side_by_side and ablations else (threads, 0)
    native, why = bf16_support()
    target_why = why if native else f"it is set for {TIME_TARGET_HARDWARE}; {why}"
    return MachinePlan(prec, _precision_why(precision), compiled, _compile_why(compile_setting, prec, compiled),
                       str(ortho).removeprefix("torch."), ortho_why, main, side, native, target_why)


def probe_step(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, batch: int,
               precision: str, threads: int, steps: int = 3) -> float:
    """Median seconds of a stage-2-shaped training step (forward, backward, Muon) here, uncompiled."""
    with runtime.threads(max(1, threads)):
        g = torch.Generator().manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=kv_heads,
                                          intermediate_size=intermediate, max_position_embeddings=512))
        mats = muon_matrices(lm)
        opt = Muon([p for p in lm.parameters() if id(p) in mats], lr=1e-3)
        ids = torch.randint(0, vocab, (batch, PROBE_TOKENS), generator=g)
        times = []
        for _ in range(steps + 1):  # the first step warms up the allocator and kernels
            t = time.perf_counter()
            with autocast(precision):
                loss = lm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])


def estimate_run_s(probe_s: float, stage2_steps: int) -> float:
    """The whole demo's seconds, from a probed step and the stage-2 step count."""
    return RUN_PER_PROBE * probe_s * stage2_steps


def describe(p: MachinePlan, time_budget_s: float) -> list[str]:
    """One line per choice, as the run prints them before it starts."""
    m = describe_machine()
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}",
             f"precision: {p.precision} ({p.precision_why})",
             f"compile: {'on' if p.compiled else 'off'} ({p.compile_why})",
             f"Muon's orthogonalisation: {p.orthogonalize_dtype} ({p.orthogonalize_why})"]
    if p.side_threads:
        lines.append(f"threads: the no-stage-1 ablation trains in a second process beside stages 1 and 2, "
                     f"{p.main_threads} + {p.side_threads} threads (a small model's step gains little from a "
                     "second thread)")
    lines.append("stage 0's vision encoder: one thread (its convolutions sum in a thread-dependent order; "
                 "one thread gives every machine the same encoder)")
    if p.estimate_s is not None:
        lines.append(f"estimated time here: about {max(1, round(p.estimate_s / 60))} min (a stage-2 step took "
                     f"{p.probe_step_s:.2f} s in a probe)" + ("; `vistune demo --quick` is a run of a few minutes"
                                                              if p.estimate_s > 600 else ""))
    lines.append(f"time target {time_budget_s:g} s: " + (f"applies ({p.time_target_why})" if p.time_target_applies
                                                          else f"not judged ({p.time_target_why})"))
    return lines
