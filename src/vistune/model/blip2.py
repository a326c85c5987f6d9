"""BLIP-2 checkpoint directories (transformers' ``Blip2ForConditionalGeneration`` layout) as vistune parts.

    vision_model.*                 the tower (EVA ViT-g in the paper); its ``post_layernorm``
                                   is BLIP-2's ``ln_vision``, which vistune's Q-Former
                                   connector holds as ``connector.norm``
    qformer.*, query_tokens        the Q-Former and its learned queries
    language_projection.*, language_model.*   not used here

transformers' AutoModel has no entry for the BLIP-2 vision model; it is registered here
so that a vistune model with a BLIP-2 tower rebuilds from its config like any other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, Blip2VisionConfig, Blip2VisionModel, PreTrainedModel

from .connectors import QFormerConnector, plain_config

AutoModel.register(Blip2VisionConfig, Blip2VisionModel, exist_ok=True)


def read_hf_state(path: str | os.PathLike, keep=lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint directory (one or sharded safetensors) whose keys pass ``keep``."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or its index); vistune reads safetensors only")
    out = {}
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            for k in f.keys():
                if keep(k):
                    out[k] = f.get_tensor(k)
    return out


def blip2_qformer_spec(path: str | os.PathLike, kind: str | None = "qformer") -> dict:
    """A qformer connector spec with the Q-Former config and query count of a BLIP-2 directory."""
    if kind not in (None, "qformer"):
        raise ValueError(f"a BLIP-2 checkpoint holds a Q-Former, not a {kind} connector")
    cfg = AutoConfig.from_pretrained(str(path))
    qcfg = getattr(cfg, "qformer_config", None)
    if qcfg is None:
        raise ValueError(f"{path} is not a BLIP-2 checkpoint (its config has no qformer_config)")
    n = int(getattr(cfg, "num_query_tokens", 32))
    eps = float(getattr(getattr(cfg, "vision_config", None), "layer_norm_eps", 1e-6))
    return {"type": "qformer", "num_queries": n, "norm_eps": eps, "qformer": plain_config(qcfg)}


def load_blip2_qformer(connector: QFormerConnector, path: str | os.PathLike) -> None:
    """Copy a BLIP-2 directory's ``qformer.*``, ``query_tokens`` and vision ``post_layernorm`` into ``connector``."""
    if not isinstance(connector, QFormerConnector):
        raise ValueError(f"BLIP-2 weights fit a qformer connector, not {type(connector).__name__}")
    state = read_hf_state(path, lambda k: k.startswith(("qformer.", "query_tokens", "vision_model.post_layernorm.")))
    mapped = {}
    for k, v in state.items():
        if k.startswith("vision_model.post_layernorm."):
            mapped["norm." + k.removeprefix("vision_model.post_layernorm.")] = v
        else:
            mapped[k] = v
    own = connector.state_dict()
    missing = sorted(k for k in own if k not in mapped)
    if missing:
        raise ValueError(f"{path}: BLIP-2 weights lack {missing[:5]} (is this a BLIP-2 checkpoint?)")
    for k in own:
        if mapped[k].shape != own[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(mapped[k].shape)}, the connector needs {tuple(own[k].shape)}")
    connector.load_state_dict({k: mapped[k].to(own[k].dtype) for k in own})


def load_blip2_vision(path: str | os.PathLike, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The vision tower of a BLIP-2 directory (its ``vision_model.*`` weights)."""
    cfg = AutoConfig.from_pretrained(str(path))
    model = Blip2VisionModel(cfg.vision_config)
    state = {k.removeprefix("vision_model."): v
             for k, v in read_hf_state(path, lambda k: k.startswith("vision_model.")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: BLIP-2 vision weights: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.to(dtype) if dtype is not None else model
