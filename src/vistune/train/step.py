"""One optimizer step over one accumulation window of micro-batches.

The loss is averaged over the supervised tokens of the whole global batch (all
micro-batches of the window, all processes), so gradient accumulation and data
parallelism give the same update as one big batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from .batches import model_inputs, supervised_tokens


@dataclass
class StepResult:
    loss: float | None  # mean over the global batch's supervised tokens; None when it had none
    tokens: int  # tokens of the global batch
    bad: list[dict]  # records found bad in this step, on every process
    cut: list[dict]  # records cut to data.max_length in this step, on every process
    grad_norm: float | None
    lr: float  # the rate this step applied


def train_step(acc, model, optimizer, scheduler, micro: list[dict], trainable: list, maybe_unused: list,
               max_grad_norm: float | None) -> StepResult:
    """Forward and backward over ``micro`` (one window), then clip, step and zero the gradients.

    ``trainable``: the parameters that learn; ``maybe_unused``: those a text-only batch leaves out
    of the graph (kept in it under DDP)."""
    world = acc.num_processes
    dev = acc.device
    local = torch.tensor(
        [sum(supervised_tokens(b) for b in micro), sum(b.get("num_tokens", 0) for b in micro),
         sum(len(b["bad"]) for b in micro), sum(len(b["cut"]) for b in micro)],
        dtype=torch.float64, device=dev)
    glob = acc.reduce(local, "sum") if world > 1 else local
    n_sup, n_tok, n_bad, n_cut = (int(x) for x in glob.tolist())
    new_bad = [b for batch in micro for b in batch["bad"]]
    new_cut = [c for batch in micro for c in batch["cut"]]
    if world > 1 and (n_bad or n_cut):
        from accelerate.utils import gather_object

        new_bad = gather_object(new_bad) if n_bad else new_bad
        new_cut = gather_object(new_cut) if n_cut else new_cut
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or world == 1 or deepspeed else acc.no_sync(model)
        if deepspeed:
            # DeepSpeed steps at accumulation boundaries that accelerate marks; the
            # window may be shorter than grad_accum at the end of an epoch.
            acc.gradient_state._set_sync_gradients(last)
        with sync:
            has_data = batch["num_samples"] > 0 and n_sup > 0
            if has_data:
                out = model(**model_inputs(batch, dev))
                # Sum of token losses / tokens of the global batch; DDP averages over
                # processes, hence x world.
                loss = out.loss * (out.num_supervised * world / n_sup)
                loss_sum += out.loss.detach().double() * out.num_supervised
            elif world > 1:
                loss = sum(p.sum() for p in trainable) * 0.0  # keep every process in the all-reduce
            else:
                continue
            if world > 1 and maybe_unused:
                # Text-only batches do not touch the tower / projector; DDP needs
                # every trainable parameter in the graph.
                loss = loss + sum(p.sum() for p in maybe_unused) * 0.0
            acc.backward(loss)
    gnorm = None
    if deepspeed:
        acc.gradient_state._set_sync_gradients(True)
        g = acc.deepspeed_engine_wrapped.get_global_grad_norm()  # DeepSpeed clipped inside its step
        gnorm = float(g) if g is not None else None
    elif n_sup > 0 and max_grad_norm:
        gnorm = float(acc.clip_grad_norm_(trainable, max_grad_norm))
    # The rate this step applies (the first group's), read before the scheduler moves on to the next
    # step's: with warmup, step 1 applies 0 and the last cosine step a small rate, not 0.
    lr = scheduler.get_last_lr()[0]
    optimizer.step()  # a step of only bad records has no gradients: the optimizer leaves the weights alone
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        loss_sum = acc.reduce(loss_sum, "sum")
    loss = float(loss_sum) / n_sup if n_sup else None
    return StepResult(loss, n_tok, new_bad, new_cut, gnorm, lr)
