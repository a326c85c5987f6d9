"""The optimizer of a run: AdamW, or Muon on the linear layers' matrices with AdamW on the rest.

Muon (``torch.optim.Muon``) orthogonalises each matrix's momentum before the step, so
every direction of an update moves the weights by the same amount, however small its
gradient. Circuits whose gradient starts small (an attention head that has to find
the object a question names among the image tokens) then form sooner: in the demo it
turned a stage 2 that never learnt to read colours (seed 1) into one that does
(docs/demo.md). Muon is defined for matrices only, and its authors keep embeddings,
the output head, norms and biases on AdamW, which is what this module does.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ConfigError, RunConfig
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
        self.muon = torch.optim.Muon(muon_groups, lr=muon_groups[0]["lr"], adjust_lr_fn="match_rms_adamw")
        # match_rms_adamw scales Muon's update to the RMS of an AdamW update, so the rates
        # of the two halves mean the same thing.
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
