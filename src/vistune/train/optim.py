"""The optimizer of a run: AdamW, or Muon on the linear layers' matrices with AdamW on the rest.

Muon (``torch.optim.Muon``) orthogonalises each matrix's momentum before the step, so
every direction of an update moves the weights by the same amount, however small its
gradient. Circuits whose gradient starts small (an attention head that has to find
the object a question names among the image tokens) then form sooner, and on seeds
where AdamW's never formed. Muon is defined for matrices only, and its authors keep
embeddings, the output head, norms and biases on AdamW, which is what this module does.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..hardware import bf16_on
from .config import SCHEDULERS, ConfigError, RunConfig, TrainConfig
from .stages import param_groups


def muon_matrices(model: nn.Module) -> set[int]:
    """ids of the weights Muon updates: every linear layer's matrix but an output head.

    GPT-2's ``Conv1D`` is a linear layer with its matrix transposed, which Muon's
    orthogonalisation does not mind. The output head is an embedding of the vocabulary,
    read one row per token like the input embedding, so it stays on AdamW (as does a head
    tied to the input embedding).
    """
    heads = {id(m.get_output_embeddings().weight) for m in model.modules()
             if hasattr(m, "get_output_embeddings") and isinstance(m.get_output_embeddings(), nn.Module)}
    return {id(m.weight) for m in model.modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m.weight.requires_grad and id(m.weight) not in heads}


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz's approximate ``U V^T`` of ``update`` (torch's quintic iteration), in ``dtype``.

    ``update`` is one matrix or a stack of them (n, rows, cols), each orthogonalised on its own.
    """
    a, b, c = coefficients
    fma = torch.baddbmm if update.dim() == 3 else torch.addmm  # beta * input + alpha * (m1 @ m2)
    x = update.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = fma(x, fma(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.mT).to(update.dtype)


def orthogonalization_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype of Muon's Newton-Schulz iteration on ``device``: bf16 where it is native, else fp32; and why."""
    native, why = bf16_on(device)
    return (torch.bfloat16 if native else torch.float32), why


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with its Newton-Schulz iteration in bf16 only where bf16 is native.

    torch always iterates in bf16. A CPU without AVX512-BF16 or AMX emulates that, many
    times slower than fp32. The update rule, the state (``momentum_buffer``) and the groups' keys are torch's, so a
    checkpoint is the same either way. Only ``adjust_lr_fn="match_rms_adamw"`` is supported.
    """

    def __init__(self, params, **kwargs) -> None:
        if kwargs.setdefault("adjust_lr_fn", "match_rms_adamw") != "match_rms_adamw":
            raise ValueError("vistune's Muon scales its rate as AdamW's (adjust_lr_fn='match_rms_adamw')")
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            # Matrices of one shape are orthogonalised together, as one stack: a small model has
            # dozens of them (q, k, v, o, the MLP's per layer), and one batched matmul per
            # iteration costs less than one per matrix.
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault(self._stack_key(p), []).append((p, update))
            for items in by_shape.values():
                shape, device = items[0][0].shape, items[0][0].device
                dtype = orthogonalization_dtype(device)[0]
                stacked = torch.stack([u for _, u in items]) if len(items) > 1 else items[0][1]
                ortho = orthogonalize(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                for i, (p, _) in enumerate(items):
                    p.mul_(1 - lr * group["weight_decay"])
                    # match_rms_adamw: the update's RMS becomes an AdamW update's, so rates carry over.
                    p.add_(ortho[i] if len(items) > 1 else ortho, alpha=-lr * (0.2 * math.sqrt(max(shape))))
        return loss

    def _stack_key(self, p: torch.Tensor) -> tuple:
        """Parameters with equal keys are orthogonalised as one stack."""
        return tuple(p.shape), p.dtype, p.device


class MuonAdamW(torch.optim.Optimizer):
    """Muon on some parameter groups and AdamW on the others, as one optimizer.

    The scheduler, accelerate and the checkpoints see one object: ``param_groups`` is
    the two optimizers' groups (the same dicts, so a scheduler's rate reaches both), and
    the state dict holds both states.
    """

    # The base class's __init__ is not called: its bookkeeping (one param_groups list it
    # owns) is what the two inner optimizers already do.
    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, betas: tuple[float, float],
                 eps: float) -> None:
        self.muon = Muon(muon_groups, lr=muon_groups[0]["lr"])
        self.adamw = torch.optim.AdamW(adamw_groups, betas=betas, eps=eps) if adamw_groups else None
        self.defaults: dict = {}

    @property
    def _parts(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict]:
        return [g for o in self._parts for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> dict:
        return {k: v for o in self._parts for k, v in o.state.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for o in self._parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this optimizer state is not a Muon + AdamW state (was the run started with "
                             "train.optimizer: adamw?)")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` over the parameters that learn, grouped by module (``param_groups``)."""
    t = cfg.train
    groups = param_groups(model, cfg)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    matrices = muon_matrices(model)
    muon_groups, adamw_groups = [], []
    for g in groups:
        mats = [p for p in g["params"] if id(p) in matrices]
        rest = [p for p in g["params"] if id(p) not in matrices]
        part = g["name"].split("/")[0]
        if mats:
            lr = g["lr"] if t.muon_lr is None else t.muon_lr
            muon_groups.append({**g, "params": mats, "lr": lr, "name": f"{part}/muon"})
        if rest:
            adamw_groups.append({**g, "params": rest})
    if not muon_groups:
        raise ConfigError("train.optimizer is muon, but no linear layer learns: use adamw")
    return MuonAdamW(muon_groups, adamw_groups, betas=tuple(t.adam_betas), eps=t.adam_eps)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.scheduler`` with ``train.warmup_ratio`` of ``total_steps`` as linear warmup.

    It scales every parameter group's own rate (the per-module rates, Muon's too) by
    the same factor: 0 -> 1 over the warmup steps, then cosine / linear decay to 0 at
    ``total_steps``, constant, or wsd: constant until the last ``train.decay_ratio`` of
    the steps, then linear to 0 (the shape of transformers' warmup_stable_decay with a
    linear decay). These are transformers' schedules, in torch's own LambdaLR:
    importing transformers' scheduler module imports peft, and through it
    bitsandbytes, which warns on every AVX512-BF16 CPU that it cannot fetch a kernel
    from the Hub, in runs that use neither.
    """
    warmup = math.ceil(t.warmup_ratio * total_steps)
    decay = math.ceil(t.decay_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.scheduler, warmup, total_steps, decay))


def lr_factor(name: str, warmup: int, total_steps: int, decay: int = 0,
              warmup_from_zero: bool = True) -> Callable[[int], float]:
    """The factor on each group's rate at a step (0-based) of ``name``'s schedule; ``decay``
    is wsd's number of final steps over which the rate falls linearly to 0. The warmup rises
    linearly from 0 at step 0 (transformers' convention), or from 1/warmup with
    ``warmup_from_zero=False``, so that its first step already moves the weights."""
    if name not in SCHEDULERS:  # the config check's own list and words: an unknown name must not fall to cosine
        raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + (0 if warmup_from_zero else 1)) / max(1, warmup)
        if name == "constant":
            return 1.0
        if name == "wsd":
            return min(1.0, max(0.0, (total_steps - step) / max(1, decay)))
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 1.0 - progress) if name == "linear" else max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor
