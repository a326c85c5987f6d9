"""Checkpoints of the original LLaVA code base (haotian-liu/LLaVA), three kinds.

full       `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` directory: the LLM's
           weights (`model.*`, `lm_head.*`) plus `model.mm_projector.*`, and a config
           with `mm_*` keys. The vision tower is usually not stored (LLaVA re-fetches
           `mm_vision_tower` at load); if `model.vision_tower.vision_tower.*` weights
           are present they are used.
projector  stage 1: `mm_projector.bin` (keys containing `mm_projector.`) over a base
           LLM (`--base`), with the stage-1 `config.json` beside it when present.
lora       `adapter_config.json` + `adapter_model.{safetensors,bin}` + `non_lora_trainables.bin`
           (the projector, keys prefixed `base_model.model.`) over the base LLM; the
           adapter is merged with peft, as LLaVA's own loader does.

The vision tower comes from a local directory (`--vision-tower`: a CLIP vision or a
whole CLIP checkpoint). LLaVA's `<image>` is not a token (it splices at id -200),
so the tokenizer gains `<image>` (and `<pad>` when it has none) on import.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from ..data.images import ImageConfig
from ..model.anyres import NEWLINE
from ..model.build import image_config_for
from ..model.vision import VisionTower, load_vision_model
from ..data.settings import DEFAULT_MAX_LENGTH
from .assemble import Imported, Settings, assemble, read_tokenizer
from .weights import InteropError, StateDict, load_exact, read_checkpoint, read_weights

# LLaVA's class names -> the plain causal LM they extend.
BASE_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
_BASE_MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
# Config keys that belong to LLaVA, not to the language model.
_LLAVA_KEYS = {
    "use_mm_proj", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side",
    "tokenizer_model_max_length", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower",
    "architectures", "auto_map", "_name_or_path",
}
_ASPECT = {"pad": "pad", "square": "crop", None: "crop"}
TOWER_PREFIX = "model.vision_tower.vision_tower."


def read_llava_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InteropError(f"{path}: cannot read the LLaVA config ({e})") from None


def text_config_from_llava(cfg: dict, source: str) -> PretrainedConfig:
    """The plain LLM config inside a LLaVA config (mm_* keys dropped, model_type fixed)."""
    archs = cfg.get("architectures") or []
    base = next((BASE_ARCHITECTURES[a] for a in archs if a in BASE_ARCHITECTURES), None)
    base = base or _BASE_MODEL_TYPES.get(cfg.get("model_type", ""))
    if base is None:
        raise InteropError(
            f"{source}: unsupported LLaVA architecture {archs or cfg.get('model_type')!r}; vistune imports "
            f"{sorted(BASE_ARCHITECTURES)} (for others, convert the LLM to a Hugging Face model and use "
            "--from llava with a projector-only checkpoint)"
        )
    d = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _LLAVA_KEYS and k != "model_type"}
    return AutoConfig.for_model(base, **d)


def check_supported(cfg: dict, source: str) -> bool:
    """Raise InteropError for what vistune cannot express; True for a LLaVA-NeXT (v1.6, anyres) checkpoint."""
    if cfg.get("mm_use_im_start_end"):
        raise InteropError(f"{source}: mm_use_im_start_end=true (<im_start>/<im_end> around images) is not "
                           "supported; LLaVA v1 and v1.5 checkpoints leave it false")
    merge = cfg.get("mm_patch_merge_type", "flat")
    aspect = cfg.get("image_aspect_ratio")
    if aspect == "anyres" and merge == "spatial_unpad":
        return True  # LLaVA-1.6: tiles unpadded, a newline after each row (vistune's anyres)
    if merge not in ("flat", None) or aspect not in _ASPECT:
        raise InteropError(f"{source}: image_aspect_ratio={aspect!r}, mm_patch_merge_type={merge!r}: vistune imports "
                           "LLaVA v1/v1.5 and v1.6 (image_aspect_ratio anyres with mm_patch_merge_type "
                           "spatial_unpad); other LLaVA-NeXT variants are not supported")
    return False


def projector_type_of(proj: StateDict, cfg: dict | None, source: str) -> str:
    """From the config when it says, else from the keys (weight/bias: linear; 0,2,...: mlpNx_gelu)."""
    if cfg and cfg.get("mm_projector_type"):
        return str(cfg["mm_projector_type"])
    if not proj:
        return "identity"
    if set(proj) == {"weight", "bias"}:
        return "linear"
    layers = {int(m.group(1)) for k in proj if (m := re.match(r"(\d+)\.", k))}
    if layers and layers == set(range(0, 2 * len(layers), 2)):
        return f"mlp{len(layers)}x_gelu"
    raise InteropError(f"{source}: cannot tell the projector type from its keys {sorted(proj)[:6]}")


def split_projector(sd: StateDict) -> tuple[StateDict, StateDict]:
    """(projector weights with the `...mm_projector.` prefix stripped, everything else)."""
    proj, rest = {}, {}
    for k, t in sd.items():
        if "mm_projector." in k:
            proj[k.split("mm_projector.", 1)[1]] = t
        else:
            rest[k] = t
    return proj, rest


def vision_tower_weights(sd: StateDict, vision_keys: set[str], source: str) -> tuple[StateDict, StateDict]:
    """(tower weights in the vision model's names, everything else)."""
    vis, rest = {}, {}
    for k, t in sd.items():
        if not k.startswith(TOWER_PREFIX):
            rest[k] = t
            continue
        sub = k[len(TOWER_PREFIX):]
        name = next((c for c in (sub, sub.removeprefix("vision_model."), f"vision_model.{sub}") if c in vision_keys),
                    None)
        if name is None:
            raise InteropError(f"{source}: vision tower weight {k} does not fit the --vision-tower model")
        vis[name] = t
    return vis, rest


def load_tower(vision_tower: str | os.PathLike | None, cfg: dict, source: str) -> PreTrainedModel:
    if vision_tower is None:
        name = cfg.get("mm_vision_tower", "?")
        raise InteropError(
            f"{source}: the vision tower ({name}) is not stored in LLaVA checkpoints; pass --vision-tower PATH, "
            "a local copy of it (a CLIP vision or whole CLIP checkpoint directory)"
        )
    if not Path(vision_tower).is_dir():
        raise InteropError(f"--vision-tower {vision_tower}: not a directory")
    vision = load_vision_model(str(vision_tower))
    width = cfg.get("mm_hidden_size")
    tower_width = VisionTower(vision).hidden_size
    if width is not None and int(width) != tower_width:
        raise InteropError(f"{source}: mm_hidden_size is {width} but the vision tower at {vision_tower} "
                           f"is {tower_width} wide (wrong --vision-tower?)")
    return vision


def settings_from(cfg: dict | None, tower: PreTrainedModel, vision_tower: str | os.PathLike, projector_type: str,
                  template: str, notes: list[str]) -> Settings:
    cfg = cfg or {}
    layer = cfg.get("mm_vision_select_layer")
    if layer is None:
        layer = -2
        notes.append("no mm_vision_select_layer in the config: using -2, as every LLaVA recipe does")
    anyres = cfg.get("image_aspect_ratio") == "anyres"
    vt = VisionTower(tower, int(layer))
    image = image_config_for(str(vision_tower), vt, "pad" if anyres else _ASPECT[cfg.get("image_aspect_ratio")])
    if anyres:  # LLaVA-NeXT writes its grids as [width, height], as vistune does
        try:
            image = ImageConfig.from_dict(image.to_dict() | {"aspect": "anyres",
                                                             "grid_pinpoints": cfg.get("image_grid_pinpoints")})
        except ValueError as e:
            raise InteropError(f"config.json: {e}") from None
    return Settings(
        projector_type=projector_type,
        vision_feature_layer=int(layer),
        vision_feature_select=cfg.get("mm_vision_select_feature", "patch"),
        template=template,
        image=image,
        max_length=int(cfg.get("tokenizer_model_max_length") or DEFAULT_MAX_LENGTH),
    )


def _dtype_of(lm: PreTrainedModel) -> torch.dtype:
    return lm.get_input_embeddings().weight.dtype


def _default_template(cfg: dict | None) -> str:
    # v1 and v1.5 were fine-tuned with conv_vicuna_v1 (`--version v1`).
    return "mpt" if (cfg or {}).get("model_type") == "llava_mpt" else "vicuna_v1"


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def import_llava_full(src: str | os.PathLike, *, vision_tower=None, template: str | None = None,
                      dtype: torch.dtype | None = None) -> Imported:
    src = Path(src)
    notes: list[str] = []
    cfg = read_llava_config(src / "config.json")
    anyres = check_supported(cfg, str(src))
    text_cfg = text_config_from_llava(cfg, str(src / "config.json"))
    vision = load_tower(vision_tower, cfg, str(src))  # before reading gigabytes of weights
    proj, rest = split_projector(read_checkpoint(src))
    vis, rest = vision_tower_weights(rest, set(vision.state_dict()), str(src))
    for k in list(rest):
        if k.endswith("rotary_emb.inv_freq"):
            del rest[k]  # a buffer old checkpoints saved; recomputed from the config
        elif k == "model.image_newline" and anyres:
            proj[NEWLINE] = rest.pop(k)  # vistune keeps it with the projector
        elif k.startswith(("model.image_newline", "model.vision_resampler")):
            raise InteropError(f"{src}: weight {k} belongs to a LLaVA-NeXT variant this config does not describe "
                               "(vistune imports v1.6: image_aspect_ratio anyres, mm_patch_merge_type spatial_unpad)")
    if anyres and NEWLINE not in proj:
        raise InteropError(f"{src}: a LLaVA-1.6 (anyres) checkpoint without model.image_newline")
    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(text_cfg)
    lm.tie_weights()  # not done under no_init_weights
    load_exact(lm, rest, f"{src} (language model)")
    vision.to(_dtype_of(lm))
    if vis:
        load_exact(vision, vis, f"{src} (vision tower)")
        notes.append(f"vision tower: {len(vis)} tensors from the checkpoint (config from {vision_tower})")
    tpl = template or _default_template(cfg)
    settings = settings_from(cfg, vision, vision_tower, projector_type_of(proj, cfg, str(src)), tpl, notes)
    tok = read_tokenizer(src)
    model = assemble(settings, vision, lm, tok, proj, source=str(src), notes=notes, dtype=dtype)
    return Imported(model, tok, "llava (full)", notes)


def _base_path(base, hint: str | None, what: str, source: str) -> Path:
    if base is not None:
        if not Path(base).is_dir():
            raise InteropError(f"--base {base}: not a directory")
        return Path(base)
    if hint and Path(hint).is_dir():
        return Path(hint)
    raise InteropError(f"{source}: {what} needs its base LLM; pass --base PATH (a local copy of {hint or 'it'})")


def import_llava_projector(src: str | os.PathLike, *, base=None, vision_tower=None, template: str | None = None,
                           dtype: torch.dtype | None = None) -> Imported:
    src = Path(src)
    notes: list[str] = []
    if src.is_dir():
        files = [src / n for n in ("mm_projector.safetensors", "mm_projector.bin") if (src / n).is_file()]
        if not files:
            raise InteropError(f"{src}: no mm_projector.bin in this directory")
        weights, cfg_file = files[0], src / "config.json"
    else:
        weights, cfg_file = src, src.parent / "config.json"
    cfg = read_llava_config(cfg_file) if cfg_file.is_file() else None
    if cfg is None:
        notes.append(f"no config.json beside {weights.name}: projector type from its keys, other settings default")
    else:
        if check_supported(cfg, str(cfg_file)):
            raise InteropError(f"{cfg_file}: a LLaVA-1.6 (anyres) projector-only checkpoint; vistune imports v1.6 "
                               "from full checkpoints only")
    proj, other = split_projector(read_weights(weights))
    if not proj:
        raise InteropError(f"{weights}: no mm_projector weights in it (keys e.g. {sorted(other)[:4]})")
    base_dir = _base_path(base, (cfg or {}).get("_name_or_path"), "a projector-only checkpoint", str(src))
    lm = AutoModelForCausalLM.from_pretrained(str(base_dir), **({"dtype": dtype} if dtype else {}))
    vision = load_tower(vision_tower, cfg or {}, str(src)).to(_dtype_of(lm))
    # Stage 1 trains on captions only (`plain`); pass --template for the chat template of stage 2.
    tpl = template or "plain"
    settings = settings_from(cfg, vision, vision_tower, projector_type_of(proj, cfg, str(weights)), tpl, notes)
    tok = read_tokenizer(base_dir)
    model = assemble(settings, vision, lm, tok, proj, source=str(weights), notes=notes, dtype=dtype)
    return Imported(model, tok, "llava (projector only)", notes)


def strip_lora_prefix(key: str) -> str:
    """LLaVA's own rule for non_lora_trainables keys: drop `base_model.`, then `model.`."""
    key = key.removeprefix("base_model.")
    return key.removeprefix("model.")


def import_llava_lora(src: str | os.PathLike, *, base=None, vision_tower=None, template: str | None = None,
                      dtype: torch.dtype | None = None) -> Imported:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    src = Path(src)
    notes: list[str] = []
    try:
        lora_cfg = LoraConfig.from_pretrained(str(src))
    except Exception as e:
        raise InteropError(f"{src / 'adapter_config.json'}: not a LoRA adapter config ({e})") from None
    cfg = read_llava_config(src / "config.json") if (src / "config.json").is_file() else None
    if cfg is not None:
        if check_supported(cfg, str(src / "config.json")):
            raise InteropError(f"{src / 'config.json'}: a LLaVA-1.6 (anyres) LoRA checkpoint; vistune imports v1.6 "
                               "from full checkpoints only (merge the LoRA with LLaVA-NeXT's tools first)")
    adapter_files = [src / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (src / n).is_file()]
    if not adapter_files:
        raise InteropError(f"{src}: no adapter_model.safetensors or adapter_model.bin")
    extra_file = src / "non_lora_trainables.bin"
    if not extra_file.is_file():
        raise InteropError(f"{src}: no non_lora_trainables.bin (LLaVA stores the projector of a LoRA run there)")
    extra = {strip_lora_prefix(k): t for k, t in read_weights(extra_file).items()}
    proj, lm_extra = split_projector(extra)
    base_dir = _base_path(base, lora_cfg.base_model_name_or_path, "a LoRA checkpoint", str(src))
    lm = AutoModelForCausalLM.from_pretrained(str(base_dir), **({"dtype": dtype} if dtype else {}))
    vision = load_tower(vision_tower, cfg or {}, str(src)).to(_dtype_of(lm))
    vis, lm_extra = vision_tower_weights(lm_extra, set(vision.state_dict()), str(extra_file))
    if vis:
        load_exact(vision, vis, f"{extra_file} (vision tower)")
    if lm_extra:  # e.g. embeddings trained beside the adapter
        rows = max((t.shape[0] for k, t in lm_extra.items() if "embed_tokens" in k or "lm_head" in k), default=0)
        if rows > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(rows, mean_resizing=False)
        result = lm.load_state_dict(lm_extra, strict=False)
        if result.unexpected_keys:
            raise InteropError(f"{extra_file}: weights the base LLM does not have: {result.unexpected_keys[:4]}")
        notes.append(f"{len(lm_extra)} LLM tensor(s) from {extra_file.name}")
    try:
        peft_model = get_peft_model(lm, lora_cfg)
    except ValueError as e:
        raise InteropError(f"{src}: the adapter does not fit the base LLM at {base_dir} ({e})") from None
    adapter = read_weights(adapter_files[0])
    result = set_peft_model_state_dict(peft_model, adapter)
    lora_params = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    if result.unexpected_keys or len(adapter) != len(lora_params):
        raise InteropError(f"{adapter_files[0]}: {len(adapter)} adapter tensors for {len(lora_params)} LoRA "
                           f"parameters; unexpected: {list(result.unexpected_keys)[:4]}")
    lm = peft_model.merge_and_unload()
    notes.append(f"merged LoRA (r={lora_cfg.r}, alpha={lora_cfg.lora_alpha}) over {base_dir}")
    tpl = template or _default_template(cfg)
    settings = settings_from(cfg, vision, vision_tower, projector_type_of(proj, cfg, str(extra_file)), tpl, notes)
    tok = read_tokenizer(src if _has_tokenizer(src) else base_dir)
    model = assemble(settings, vision, lm, tok, proj, source=str(extra_file), notes=notes, dtype=dtype)
    return Imported(model, tok, "llava (LoRA merged)", notes)

