"""The vision side of a GGUF export: llama.cpp's multimodal projector file (``mmproj``).

llama.cpp's multimodal library (mtmd, ``tools/mtmd/clip.cpp``) runs a ViT vision tower
under a LLaVA projector (``clip.projector_type = "mlp"``) as follows: patch embedding
(+ CLS token) + position embeddings, optional pre-LayerNorm, ``block_count`` encoder
layers, the hidden state of layer ``clip.vision.feature_layer``, the CLS row dropped,
then ``mm.0`` -> GELU -> ``mm.2``. Images are fitted into a square of
``clip.vision.image_size`` (bicubic, padded with LLaVA's grey) and normalised with
``image_mean`` / ``image_std``.

    vistune (transformers names)                    mmproj GGUF
    embeddings.class_embedding                      v.class_embd
    embeddings.patch_embedding.{weight,bias}        v.patch_embd.{weight,bias}
    embeddings.position_embedding.weight            v.position_embd.weight
    pre_layrnorm.*                                  v.pre_ln.*
    encoder.layers.N.self_attn.{q,k,v,out}_proj.*   v.blk.N.attn_{q,k,v,out}.*
    encoder.layers.N.layer_norm{1,2}.*              v.blk.N.ln{1,2}.*
    encoder.layers.N.mlp.fc{1,2}.*                  v.blk.N.ffn_{up,down}.*
    projector.0.* / projector.2.*                   mm.0.* / mm.2.*

Only the layers up to the feature layer are written (llama.cpp runs no others), and no
post-LayerNorm: the feature layer's hidden state is read before it, as transformers'
``hidden_states`` are. A ``linear`` (or ``identity``) projector has no GELU, which
llama.cpp's MLP always applies after ``mm.0``; it is written as the exact
equivalent ``mm.0 = [W; -W]``, ``mm.2 = [I, -I]``, since GELU(z) - GELU(-z) = z.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.vlm import VisionLanguageModel
from .gguf_tensors import add_tensor, file_type, require_gguf
from .weights import InteropError

# Key names as llama.cpp's clip loader reads them (tools/mtmd/clip-impl.h).
ARCH = "clip"
PROJECTOR_MLP = "mlp"
VISION_TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}
SUPPORTED_TOWERS = "CLIP and SigLIP ViT towers (clip_vision_model, siglip_vision_model)"
SUPPORTED_PROJECTORS = "linear, identity, mlp1x_gelu and mlp2x_gelu"
# The ViT MLP's activation: llama.cpp's GELU (tanh form) when clip.use_gelu, else quick GELU.
_GELU_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new")
_QUICK_GELU_ACTS = ("quick_gelu",)
# llama.cpp pads non-square images with this colour for LLaVA projectors (clip.cpp).
LLAMA_CPP_PAD_COLOR = (122, 116, 104)

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
_EMBED_NAMES = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
# read by llama.cpp as floats (convolution kernel, embeddings it adds or gathers)
_FLOAT_ONLY = ("v.class_embd", "v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight")
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class MmprojPlan:
    """What the mmproj file will hold, decided (and checked) before anything is written."""

    tower: str  # CLIP | SigLIP
    feature_index: int  # hidden_states index llama.cpp reads: layers run before it
    use_gelu: bool
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def _tower_weights(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    sd = model.vision.model.state_dict()
    return {k.removeprefix("vision_model."): v for k, v in sd.items()}


def projector_tensors(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """vistune's projector as llama.cpp's ``mm.0`` / ``mm.2`` (the linear one as its GELU-exact MLP)."""
    kind = model.config.projector_type
    proj = model.projector
    if kind in ("linear", "mlp1x_gelu", "identity"):
        if kind == "identity":
            dim = model.vision.hidden_size
            w, b = torch.eye(dim), torch.zeros(dim)
        else:
            lin = proj if isinstance(proj, torch.nn.Linear) else proj[0]
            w = lin.weight.detach().float()
            b = lin.bias.detach().float() if lin.bias is not None else torch.zeros(w.shape[0])
        out = w.shape[0]
        eye = torch.eye(out)
        return {"mm.0.weight": torch.cat([w, -w]), "mm.0.bias": torch.cat([b, -b]),
                "mm.2.weight": torch.cat([eye, -eye], dim=1), "mm.2.bias": torch.zeros(out)}
    if kind == "mlp2x_gelu":
        return {f"mm.{k}": v.detach() for k, v in proj.state_dict().items()}
    raise InteropError(f"llama.cpp's LLaVA projector is at most Linear-GELU-Linear; this model's projector "
                       f"{kind!r} cannot be expressed in it (GGUF export supports {SUPPORTED_PROJECTORS})")


def plan_mmproj(model: VisionLanguageModel) -> MmprojPlan:
    """Check that llama.cpp can run this model's vision side and map its tensors; raises InteropError."""
    if model.config.image.aspect == "anyres":
        raise InteropError("GGUF export of anyres (LLaVA-NeXT) models is not supported yet: export to llava-hf "
                           "(LlavaNextForConditionalGeneration) instead")
    vcfg = model.vision.model.config
    kind = getattr(vcfg, "model_type", type(model.vision.model).__name__)
    tower = VISION_TOWERS.get(kind)
    if tower is None:
        raise InteropError(f"the vision tower is {kind!r} ({type(model.vision.model).__name__}); llama.cpp's "
                           f"LLaVA projector runs {SUPPORTED_TOWERS} only")
    cfg = model.config
    if cfg.connector:
        raise InteropError(f"this model has a {cfg.connector['type']} connector; llama.cpp's LLaVA projector "
                           "has none (keep the vistune format)")
    act = getattr(vcfg, "hidden_act", "")
    if act not in _GELU_ACTS + _QUICK_GELU_ACTS:
        raise InteropError(f"the {tower} tower's MLP activation {act!r} has no llama.cpp equivalent "
                           f"(supported: {', '.join(_GELU_ACTS + _QUICK_GELU_ACTS)})")
    n_layers = int(vcfg.num_hidden_layers)
    if not -(n_layers + 1) <= cfg.vision_feature_layer <= n_layers:
        raise InteropError(f"vision_feature_layer {cfg.vision_feature_layer} is outside the tower's "
                           f"{n_layers} layers")
    index = cfg.vision_feature_layer % (n_layers + 1)
    if index == 0:
        raise InteropError("vision_feature_layer selects the embeddings (before any layer); llama.cpp's LLaVA "
                           "graph reads the output of a layer (1 or more)")
    if cfg.vision_feature_select != "patch":
        raise InteropError(f"vision_feature_select {cfg.vision_feature_select!r} keeps the CLS token; llama.cpp's "
                           "LLaVA projector always drops it (supported: 'patch')")
    side = int(vcfg.image_size) // int(vcfg.patch_size)
    if side * side != cfg.num_image_tokens:
        raise InteropError(f"llama.cpp gives {side * side} image tokens ({vcfg.image_size} px / patch "
                           f"{vcfg.patch_size}) but the model expects {cfg.num_image_tokens}")
    if cfg.image.size != int(vcfg.image_size):
        raise InteropError(f"image size {cfg.image.size} differs from the vision tower's {vcfg.image_size}; "
                           "llama.cpp resizes images to the tower's size")
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    for k, t in _tower_weights(model).items():
        if k in _EMBED_NAMES:
            tensors[_EMBED_NAMES[k]] = t
            continue
        m = _LAYER_RE.match(k)
        if m and m.group(2) in _LAYER_NAMES:
            if int(m.group(1)) < index:
                tensors[f"v.blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"] = t
            continue
        if k.startswith(("post_layernorm.", "head.")) or k.endswith("position_ids"):
            continue  # after the feature layer, or a buffer
        unknown.append(k)
    if unknown:
        raise InteropError(f"the {tower} tower has weights llama.cpp's ViT does not define: {unknown[:4]}")
    if "v.class_embd" in tensors and tensors["v.class_embd"].dim() != 1:
        raise InteropError(f"the {tower} tower's class embedding has shape {tuple(tensors['v.class_embd'].shape)}")
    n_ff, hidden = int(vcfg.intermediate_size), int(vcfg.hidden_size)
    if n_ff == hidden:
        # llama.cpp swaps ffn_up/ffn_down of LLaVA files whose ffn_down has rows of the embedding width
        # (old converters wrote them swapped); write them swapped so that it swaps them back.
        for i in range(index):
            for part in ("weight", "bias"):
                up, down = f"v.blk.{i}.ffn_up.{part}", f"v.blk.{i}.ffn_down.{part}"
                tensors[up], tensors[down] = tensors[down], tensors[up]
    tensors.update(projector_tensors(model))
    notes = []
    if "v.class_embd" in tensors:
        notes.append(f"the {tower} tower has a CLS token: llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp, as of "
                     "llama.cpp 0c1e570; ggml-org/llama.cpp#25814) puts it last and drops the first patch instead "
                     "of it, so llama.cpp sees shifted image features until that is fixed (docs/interop.md); towers "
                     "without one (SigLIP) run exactly")
    image = cfg.image
    if image.aspect != "pad" or image.pad_color != LLAMA_CPP_PAD_COLOR:
        notes.append(f"llama.cpp fits non-square images into the square and pads them with {LLAMA_CPP_PAD_COLOR}; "
                     f"this model was trained with aspect {image.aspect!r} (pad colour {image.pad_color}): "
                     "square images are seen identically, others differently")
    if image.resample != "bicubic":
        notes.append(f"llama.cpp resizes bicubic; this model resizes {image.resample}: images of another size "
                     "than the tower's are resampled slightly differently")
    return MmprojPlan(tower, index, act in _GELU_ACTS, tensors, notes)


def write_mmproj(model: VisionLanguageModel, plan: MmprojPlan, path: str | os.PathLike, outtype: str,
                 name: str) -> Path:
    """Write the planned mmproj file at ``path`` (a path inside the caller's atomic directory)."""
    gguf = require_gguf()
    vcfg = model.vision.model.config
    cfg = model.config
    text_dim = model.language_model.get_input_embeddings().embedding_dim
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(f"{name} (mmproj)")
    w.add_file_type(file_type(outtype))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", PROJECTOR_MLP)
    w.add_bool("clip.use_gelu", plan.use_gelu)
    w.add_uint32("clip.vision.image_size", int(vcfg.image_size))
    w.add_uint32("clip.vision.patch_size", int(vcfg.patch_size))
    w.add_uint32("clip.vision.embedding_length", int(vcfg.hidden_size))
    w.add_uint32("clip.vision.feed_forward_length", int(vcfg.intermediate_size))
    w.add_uint32("clip.vision.projection_dim", text_dim)
    w.add_uint32("clip.vision.block_count", plan.feature_index)
    w.add_uint32("clip.vision.attention.head_count", int(vcfg.num_attention_heads))
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(vcfg.layer_norm_eps))
    w.add_array("clip.vision.image_mean", [float(x) for x in cfg.image.mean])
    w.add_array("clip.vision.image_std", [float(x) for x in cfg.image.std])
    w.add_array("clip.vision.feature_layer", [plan.feature_index])
    for tname, t in plan.tensors.items():
        add_tensor(w, tname, t, outtype, float_only=tname in _FLOAT_ONLY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
