"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUTPUT_DIR/checkpoints/step-00000040/
        trainable.safetensors   the weights that learn (frozen ones are rebuilt from the config)
        optimizer.pt            optimizer state (tensors and numbers only: read with weights_only=True)
        scheduler.json          learning-rate schedule position
        rng.json                Python / NumPy / torch RNG states of every process
        trainer_state.json      step, epoch, data position, bad records, the data plan

Each checkpoint is written to a temporary directory and renamed into place, so a
run killed while saving leaves the previous checkpoints intact; only complete
checkpoints (with trainer_state.json) are ever resumed from.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_directory, remove_leftovers, write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def clean_partial(output_dir: str | Path) -> None:
    """Remove temporary directories left by a run killed while saving."""
    remove_leftovers(Path(output_dir) / CHECKPOINTS)


def remove_checkpoints(output_dir: str | Path) -> None:
    """Remove a run's checkpoints once nothing is left to resume (they can be as large as
    everything else in a run's folder); the model and metrics stay."""
    shutil.rmtree(Path(output_dir) / CHECKPOINTS, ignore_errors=True)


def prune(output_dir: str | Path, keep_last: int) -> None:
    for p in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


# -- RNG -----------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# -- save / load -----------------------------------------------------------------------
def save_checkpoint(path: Path, *, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, rng_states: list[dict], state: dict) -> Path:
    with atomic_directory(path) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        write_loop_state(tmp, scheduler_state=scheduler_state, rng_states=rng_states, state=state)
    return path


def write_loop_state(path: Path, *, scheduler_state: dict, rng_states: list[dict], state: dict) -> None:
    """Schedule, RNG and position; trainer_state.json last, as it marks the checkpoint complete."""
    write_json(path / "scheduler.json", scheduler_state, indent=None)
    write_json(path / "rng.json", rng_states, indent=None)
    write_json(path / STATE_FILE, state)


def read_state(path: str | Path) -> dict:
    path = Path(path)
    f = path / STATE_FILE
    if not f.exists():
        raise FileNotFoundError(f"not a complete training checkpoint (no {STATE_FILE}): {path}")
    return json.loads(f.read_text())


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the saved trainable weights into ``model``; every trainable weight must be there."""
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(want - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match this run's trainable weights: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]} (did train.vision / projector / llm or lora settings change?)"
        )
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v)


def load_optimizer_state(path: Path) -> dict:
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)


def load_scheduler_state(path: Path) -> dict:
    return json.loads((path / "scheduler.json").read_text())


def load_rng_states(path: Path) -> list[dict]:
    return json.loads((path / "rng.json").read_text())
