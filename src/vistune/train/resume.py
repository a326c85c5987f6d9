"""Whether a checkpoint may be continued with this run's settings.

A checkpoint records the settings its run computed with; a resume compares them with
its own and refuses any change that changes what the run computes (rates, schedule,
batch, data, template, precision, LoRA...), naming each key with both values. Keys
that only decide what is shown, kept or how fast data loads may change.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import ConfigError, RunConfig

# Keys whose value cannot change the weights a run computes. gradient_checkpointing recomputes the
# same activations (with the RNG state put back); max_bad_records only decides whether a run stops.
FREE_KEYS = frozenset({
    "output_dir", "train.log_every", "train.progress", "train.report_to", "train.save_every", "train.keep_last",
    "train.resume", "train.overwrite", "train.save_projector", "train.max_bad_records",
    "train.gradient_checkpointing", "data.num_workers",
})
# Paths compared as absolute paths: the same file named from another working directory is no change.
PATH_KEYS = frozenset({"model.from", "model.vision", "model.llm", "model.tokenizer", "model.projector_from",
                       "data.train", "data.images"})


def run_settings(cfg: RunConfig) -> dict:
    """The settings that decide what ``cfg`` computes, flat (``train.lr``), as a checkpoint stores them."""
    flat = _flat(cfg.to_dict())
    out = {}
    for key, value in flat.items():
        if key in FREE_KEYS:
            continue
        if key in PATH_KEYS and isinstance(value, str):
            value = os.path.abspath(os.path.expanduser(value))
        out[key] = value
    return json.loads(json.dumps(out))  # as trainer_state.json gives it back (tuples as lists)


def check_settings(checkpoint: str | Path, saved: dict | None, cfg: RunConfig) -> None:
    """Raise ConfigError naming every setting of ``cfg`` that differs from ``saved`` (a checkpoint's
    `run_settings`; None for checkpoints written before they were stored)."""
    if saved is None:
        return
    now = run_settings(cfg)
    diff = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if k not in FREE_KEYS and saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"cannot resume from {checkpoint}: it was trained with other settings ({'; '.join(diff)}); "
                          "resume with those, or start afresh with --overwrite or a new output_dir")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
