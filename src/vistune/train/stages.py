"""What a run trains: the model it starts from, and which modules learn.

LLaVA's two stages are two settings of the same switches:

    stage 1 (feature alignment)   vision frozen, projector full, llm frozen
    stage 2 (instruction tuning)  vision frozen, projector full, llm full | lora

From-scratch tiny models set ``train.vision: full`` and use the same code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..files import atomic_path
from ..model.adapters import adapter_host, set_adapter_host
from ..model.build import build_vlm
from ..model.checkpoint import load_model
from ..model.unwrap import unwrap_peft
from ..model.vlm import VisionLanguageModel
from ..data.settings import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE
from .config import ConfigError, RunConfig, check_paths, module_lr, module_mode

MODULES = ("vision", "projector", "connector", "llm")
PROJECTOR_FILE = "projector.safetensors"


def build_model(cfg: RunConfig) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """The model a run starts from (weights in fp32; autocast handles lower precision)."""
    m, data = cfg.model, cfg.data
    check_paths(cfg, data=False)
    if m.from_ is not None:
        model, tok = load_model(m.from_, dtype=torch.float32)
        if m.projector is not None and m.projector != model.config.projector_type:
            raise ConfigError(
                f"model.projector is {m.projector!r} but {m.from_} has a {model.config.projector_type!r} projector"
            )
    elif m.vision is not None and m.llm is not None:
        model, tok = build_vlm(
            m.vision, m.llm, m.tokenizer,
            projector_type=m.projector or "mlp2x_gelu",
            connector=m.connector, num_queries=m.num_queries, connector_options=m.connector_options,
            connector_from=m.connector_from,
            vision_feature_layer=m.vision_feature_layer,
            vision_feature_select=m.vision_feature_select,
            template=data.template or DEFAULT_TEMPLATE,
            image_aspect=m.image_aspect,
            image_grid_pinpoints=m.image_grid_pinpoints,
            max_tiles=m.max_tiles,
            max_length=data.max_length or DEFAULT_MAX_LENGTH,
        )
    else:
        raise ConfigError("no model: set model.from, or model.vision and model.llm")
    # The model remembers the template and length it was trained with, for inference.
    if data.template is not None:
        model.config.template = data.template
    if data.max_length is not None:
        model.config.max_length = data.max_length
    if m.projector_from is not None:
        load_projector(model, m.projector_from)
    return model, tok


# -- projector-only files ----------------------------------------------------------
# Projector weights under other tools' names, mapped onto vistune's nn.Sequential.
_PROJECTOR_PREFIXES = ("projector.", "model.mm_projector.", "mm_projector.", "model.multi_modal_projector.",
                       "multi_modal_projector.")
_LLAVA_HF_NAMES = {"linear_1": "0", "linear_2": "2"}


def save_projector(model: VisionLanguageModel, path: str | os.PathLike) -> Path:
    """Write the projector alone (safetensors), for a later stage's ``model.projector_from``."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.projector.state_dict().items()}
    meta = {
        "format": "pt",
        "projector_type": model.config.projector_type,
        "vision_hidden_size": str(model.vision.hidden_size),
        "text_hidden_size": str(model.language_model.get_input_embeddings().embedding_dim),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_projector(model: VisionLanguageModel, path: str | os.PathLike) -> None:
    """Load projector weights from a safetensors file (vistune, LLaVA or llava-hf key names)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.exists():
        raise ConfigError(f"model.projector_from: file not found: {path}")
    if path.suffix != ".safetensors":
        raise ConfigError(f"model.projector_from: {path} is not a .safetensors file (vistune never loads pickles)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {_projector_key(k): f.get_tensor(k) for k in f.keys()}
    kind = meta.get("projector_type")
    if kind and kind != model.config.projector_type:
        raise ConfigError(
            f"model.projector_from: {path} holds a {kind!r} projector but the model's is "
            f"{model.config.projector_type!r} (set model.projector: {kind})"
        )
    own = model.projector.state_dict()
    if set(state) != set(own):
        raise ConfigError(
            f"model.projector_from: {path} has keys {sorted(state)[:6]}, the model's projector has {sorted(own)[:6]}"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ConfigError(
                f"model.projector_from: {path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)} "
                "(the vision tower or LLM differs from the one the projector was trained with)"
            )
    model.projector.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _projector_key(k: str) -> str:
    for p in _PROJECTOR_PREFIXES:
        if k.startswith(p):
            k = k[len(p):]
            break
    head, _, rest = k.partition(".")
    return f"{_LLAVA_HF_NAMES.get(head, head)}.{rest}" if rest else k


# -- what learns ---------------------------------------------------------------------
def module_of(model: VisionLanguageModel, part: str) -> nn.Module:
    """One of MODULES; a model without a connector has an empty one (no parameters)."""
    if part == "connector":
        return model.connector if model.connector is not None else nn.Module()
    return {"vision": model.vision, "projector": model.projector, "llm": model.language_model}[part]


def apply_modes(model: VisionLanguageModel, cfg: RunConfig, compute_dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> VisionLanguageModel:
    """Freeze, fully train, or wrap with LoRA each of vision / projector / llm.

    ``compute_dtype`` and ``device`` matter to QLoRA only (``lora.bits`` 4 or 8): the
    quantized layers compute in the run's precision and are quantized where the run trains.
    """
    from .lora import wrap_lora

    t = cfg.train
    for part in MODULES:
        mode = module_mode(t, part)
        mod = module_of(model, part)
        mod.requires_grad_(mode == "full")
        if mode == "lora":
            host = adapter_host(model, part)
            if host is None:
                raise ConfigError("train.connector: lora needs a qformer connector (LoRA wraps its Q-Former)")
            set_adapter_host(model, part, wrap_lora(host, cfg.lora, part, compute_dtype, device))
    if t.gradient_checkpointing:
        for part in ("vision", "llm"):
            if getattr(t, part) == "frozen" and part == "vision":
                continue  # a frozen tower runs without grad: nothing to recompute
            hf = model.vision.model if part == "vision" else model.language_model
            base = unwrap_peft(hf)
            if getattr(base, "supports_gradient_checkpointing", False):
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                base.config.use_cache = False
    return model


def compile_decoder(model: VisionLanguageModel, device: torch.device) -> str | None:
    """torch.compile the LM's decoder layers in place, for training (``train.compile``).

    Regional: each of the decoder's repeated layers is compiled on its own, and layers of
    one class share one compiled graph, so a deep LM compiles one layer's worth instead of
    its whole unrolled stack, at the price of the fusions across layers (measured:
    benchmarks/compile_time.py).
    Only the decoder: the splice of image tokens and the loss have data-dependent shapes
    that would break the graph. ``Module.compile`` keeps the modules and their state-dict
    keys, so checkpoints and the saved model are those of an uncompiled run. A decoder
    without a list of like layers is compiled whole.

    Dynamic shapes from the start: batches vary in length, and a static first graph would
    be compiled again as a dynamic one. On a CPU, SDPA gives way to eager attention, whose
    matmuls and softmax inductor fuses, where SDPA's CPU kernel is one opaque op to it
    (so small CPU steps run faster).
    Returns the attention implementation it replaced (to restore before saving), or None.
    """
    base = unwrap_peft(model.language_model)
    replaced = None
    # config._attn_implementation is transformers' only way to read which attention runs.
    if device.type == "cpu" and base.config._attn_implementation == "sdpa":
        base.set_attn_implementation("eager")
        replaced = "sdpa"
    decoder = getattr(base, base.base_model_prefix)
    layers = repeated_layers(decoder)
    for region in layers if layers is not None else [decoder]:
        region.compile(dynamic=True)
    return replaced


def repeated_layers(decoder: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of layers of one class (Llama's ``layers``, GPT-2's ``h``), if it has one."""
    for child in decoder.children():
        if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            return child
    return None


def set_train_mode(model: VisionLanguageModel, cfg: RunConfig) -> None:
    """train() for learning modules; eval() (no dropout) for frozen ones.

    transformers checkpoints a layer only while that layer is in training mode, and a
    frozen LLM still runs a backward (stage 1: through every layer to the projector), so
    with ``train.gradient_checkpointing`` its layers' own flags go back up. Their
    attention, MLP and dropout submodules stay in eval: checkpointed, still no dropout.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.train()
    for part in MODULES:
        if module_mode(cfg.train, part) == "frozen":
            mod = module_of(model, part)
            mod.eval()
            if cfg.train.gradient_checkpointing:
                for m in mod.modules():
                    if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                        m.training = True  # this module only, not its children


def trainable_summary(model: VisionLanguageModel) -> dict[str, tuple[int, int]]:
    """{module: (trainable params, total params)}."""
    out = {}
    for part in MODULES:
        params = list(module_of(model, part).parameters())
        out[part] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return out


def param_groups(model: VisionLanguageModel, cfg: RunConfig) -> list[dict]:
    """AdamW groups: one per module and decay / no-decay.

    Biases and norm weights (1-D tensors) get no weight decay, as in LLaVA's trainer.
    """
    groups = []
    seen: set[int] = set()
    for part in MODULES:
        decay, no_decay = [], []
        for p in module_of(model, part).parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
        lr = module_lr(cfg.train, part)
        for params, wd, kind in ((decay, cfg.train.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{part}/{kind}"})
    if not groups:
        raise ConfigError("no parameter requires a gradient: check train.vision / train.projector / train.llm")
    return groups


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that learn, by their names in ``model`` (what checkpoints store)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def describe(model: VisionLanguageModel, cfg: RunConfig) -> str:
    parts = []
    for part, (tr, tot) in trainable_summary(model).items():
        if part == "connector" and model.connector is None:
            continue
        parts.append(f"{part}: {module_mode(cfg.train, part)} ({tr / 1e6:.2f}M / {tot / 1e6:.2f}M trainable)")
    return "; ".join(parts)


def modes_of(model: VisionLanguageModel, cfg: RunConfig) -> dict[str, str]:
    """{module: mode} of the modules the model has (the connector only where there is one)."""
    return {p: module_mode(cfg.train, p) for p in MODULES if p != "connector" or model.connector is not None}


def run_info(cfg: RunConfig, model: VisionLanguageModel) -> dict:
    return {"modules": modes_of(model, cfg),
            "trainable": {p: list(v) for p, v in trainable_summary(model).items()},
            "projector_type": model.config.projector_type}
