"""Weight files in and out, safely.

Every foreign weight file goes through `read_weights`: safetensors when it is one,
and pickled `.bin` files through ``torch.load(weights_only=True)``, which refuses a
pickle that would build anything but tensors and plain containers. (Opening a
`.bin` with a plain unpickler runs whatever code its author put in it.)
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from tqdm.auto import tqdm

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class InteropError(ValueError):
    """A checkpoint cannot be converted; the message names the file, key or field."""


class UnsafeCheckpointError(InteropError):
    """A pickled weight file holds more than tensors and was refused."""


def read_weights(path: str | os.PathLike) -> StateDict:
    """A flat ``{name: tensor}`` from one safetensors or `.bin` file (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise InteropError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise InteropError(f"{path}: unknown weight file type (expected .safetensors or .bin)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors ({first}). vistune loads .bin "
            "files with torch.load(weights_only=True) only; if you trust the file, convert it to "
            "safetensors yourself"
        ) from None
    except Exception as e:
        raise InteropError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise InteropError(f"{path}: expected a flat mapping of names to tensors, got {type(obj).__name__}")
    return obj


# Shard indexes and single files, in order of preference.
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face-style model directory (sharded or not); [] if none."""
    d = Path(directory)
    for index, single in _WEIGHT_LAYOUTS:
        if (d / index).is_file():
            try:
                names = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise InteropError(f"{d / index}: not a shard index ({e})") from None
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise InteropError(f"{d / index} lists shards that are missing: {missing}")
            return [d / n for n in names]
        if (d / single).is_file():
            return [d / single]
    return []


def read_checkpoint(directory: str | os.PathLike) -> StateDict:
    """All weights of a model directory, shard by shard (with progress for big models)."""
    files = weight_files(directory)
    if not files:
        raise InteropError(
            f"{directory}: no weights found (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
        )
    sd: StateDict = {}
    for f in tqdm(files, desc="reading shards", unit="shard", disable=len(files) < 2):
        part = read_weights(f)
        dup = sd.keys() & part.keys()
        if dup:
            raise InteropError(f"{f}: tensors also stored in another shard: {sorted(dup)[:5]}")
        sd.update(part)
    return sd


def write_weights(sd: StateDict, directory: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """Write safetensors shards (+ index when more than one) the way transformers does."""
    from huggingface_hub import split_torch_state_dict_into_shards

    seen: set[int] = set()
    sd = dict(sd)
    for name, t in sd.items():  # safetensors stores no aliases: an untied copy gets its own memory
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            sd[name] = t.clone()
        seen.add(ptr)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in tqdm(split.filename_to_tensors.items(), desc="writing shards", unit="shard",
                                disable=len(split.filename_to_tensors) < 2):
        save_file({n: sd[n].contiguous() for n in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(split.filename_to_tensors)


def tied_groups(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (tied embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def tied_names(module: nn.Module) -> set[str]:
    return {n for g in tied_groups(module) for n in g}


def load_exact(module: nn.Module, sd: StateDict, source: str) -> None:
    """Load ``sd`` into ``module`` keeping each tensor's dtype; any gap or leftover is an error.

    Tensors are assigned, not copied, so a conversion never changes a value (a float16
    checkpoint stays float16, and a round trip is bit-identical). A tied group stored
    under one of its names gives that tensor to all of them.
    """
    sd = dict(sd)
    groups = tied_groups(module)
    for group in groups:
        present = [n for n in group if n in sd]
        for n in group:
            if present and n not in sd:
                sd[n] = sd[present[0]]
    try:
        result = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise InteropError(f"{source}: weights do not fit the model: {detail[:600]}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        raise InteropError(f"{source}: weights do not fit the model: " + "; ".join(parts))
    for m in module.modules():  # assignment replaced tied parameters one by one; share them again
        if isinstance(m, PreTrainedModel):
            m.tie_weights()
