"""transformers' llava-hf format (`LlavaForConditionalGeneration`): import and export.

Key layouts (all read; export writes `old` by default, the layout of the llava-hf
checkpoints on the Hub, which every transformers and vLLM version loads):

    vistune                         llava-hf old                      llava-hf new (2025)
    vision.model.X                  vision_tower.vision_model.X       model.vision_tower.vision_model.X
    projector.0.* / projector.2.*   multi_modal_projector.linear_1/2  model.multi_modal_projector.linear_1/2
    language_model.<base>.X         language_model.model.X            model.language_model.X
    language_model.lm_head.*        language_model.lm_head.*          lm_head.*

(transformers 5 itself keeps CLIP/SigLIP weights without the `vision_model.` level
and accepts both.) Besides the weights, an export writes the processor (tokenizer
with `<image>`, image settings, chat template rendering the model's vistune
template) and `vistune.json`, which makes a round trip exact.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    LlavaConfig,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from .. import __version__
from ..data.images import CLIP_MEAN, CLIP_STD, ImageConfig
from ..files import atomic_directory, write_json
from ..model.anyres import NEWLINE
from ..model.unwrap import unwrap_peft
from ..model.vision import VisionTower
from ..model.vlm import VisionLanguageModel
from ..data.settings import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE
from ..text.templates import get_template
from .assemble import Imported, Settings, assemble, read_tokenizer
from .chat_template import guess_template_name, jinja_chat_template
from .llava_next import anyres_image_config, is_next_config, newline_weights, next_config, next_processor, take_newline
from .weights import InteropError, StateDict, load_exact, read_checkpoint, tied_names, write_weights

VISTUNE_META = "vistune.json"
KEY_LAYOUTS = ("old", "new")
# Vision models whose Hub checkpoints nest their weights under `vision_model.`.
_NESTED_VISION = ("clip_vision_model", "siglip_vision_model")
# PIL resampling codes used by Hugging Face image processors.
_RESAMPLE_CODE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
_RESAMPLE_NAME = {v: k for k, v in _RESAMPLE_CODE.items()}
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


# -- shared pieces --------------------------------------------------------------
def head_name(lm: PreTrainedModel) -> str:
    """Module name of the LM's output projection (``lm_head`` for every common LLM)."""
    out = lm.get_output_embeddings()
    for name, mod in lm.named_modules():
        if mod is out:
            return name
    raise InteropError(f"{type(lm).__name__} has no output embedding layer")


def feature_strategy(tower: VisionTower, select: str) -> tuple[str, int]:
    """vistune's feature selection as llava-hf's (strategy, num_additional_image_tokens)."""
    has_cls = tower.has_cls
    if select == "patch":
        # llava-hf's "default" always drops the first token; right only with a CLS token.
        return ("default", 1) if has_cls else ("full", 0)
    if not has_cls:
        raise InteropError("vision_feature_select 'cls_patch' needs a vision tower with a CLS token")
    return "full", 1


def select_from_strategy(tower: VisionTower, strategy: str) -> str:
    has_cls = tower.has_cls
    if strategy == "default":
        if not has_cls:
            raise InteropError(
                "vision_feature_select_strategy 'default' drops the first token, but this vision tower has "
                "no CLS token (it would drop a real patch); vistune cannot express that"
            )
        return "patch"
    if strategy == "full":
        return "cls_patch" if has_cls else "patch"
    raise InteropError(f"unknown vision_feature_select_strategy {strategy!r} (expected default or full)")


def image_processor_kwargs(image: ImageConfig) -> dict:
    """LlavaImageProcessor settings for vistune's image settings.

    pad: LLaVA's pad-to-square with the (truncated) mean colour, then resize: the same
    steps as vistune. resize: a squash to size x size. crop: shortest-edge resize then
    centre crop, where vistune crops first and then resizes (same for square images,
    within resampling differences otherwise).
    """
    s = image.size
    kw = dict(image_mean=list(image.mean), image_std=list(image.std), resample=_RESAMPLE_CODE[image.resample],
              do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    if image.aspect == "resize":
        return {**kw, "do_pad": False, "size": {"height": s, "width": s}, "do_center_crop": False,
                "crop_size": {"height": s, "width": s}}
    return {**kw, "do_pad": image.aspect == "pad", "size": {"shortest_edge": s}, "do_center_crop": True,
            "crop_size": {"height": s, "width": s}}


def image_config_from_processor(d: dict, size: int, source: str) -> ImageConfig:
    """vistune image settings from a Hugging Face image processor's settings."""
    mean = tuple(d.get("image_mean") or CLIP_MEAN)
    std = tuple(d.get("image_std") or CLIP_STD)
    resample = _RESAMPLE_NAME.get(int(d.get("resample", 3)), "bicubic")
    crop = d.get("do_center_crop", True)
    dims = d.get("crop_size") if crop else d.get("size")
    if isinstance(dims, dict):
        got = dims.get("height") or dims.get("shortest_edge")
    elif isinstance(dims, int):
        got = dims
    else:
        got = size
    if got != size:
        raise InteropError(f"{source}: image processor makes {got}px images but the vision tower takes {size}px")
    if d.get("do_pad"):
        aspect = "pad"
    elif crop:
        aspect = "crop"
    else:
        aspect = "resize"
    return ImageConfig(size=size, aspect=aspect, mean=mean, std=std, resample=resample)


def _read_processor_settings(src: Path) -> dict:
    pp = src / "preprocessor_config.json"
    if pp.is_file():
        return json.loads(pp.read_text())
    proc = src / "processor_config.json"
    if proc.is_file():
        return json.loads(proc.read_text()).get("image_processor", {})
    return {}


# -- import ---------------------------------------------------------------------
def _resolve(candidates: list[str], targets: set[str]) -> str | None:
    return next((c for c in candidates if c in targets), None)


def split_llava_hf(sd: StateDict, vision_keys: set[str], lm_keys: set[str], lm_prefix: str, head: str,
                   source: str) -> tuple[StateDict, StateDict, StateDict]:
    """llava-hf weights (any layout) -> (vision, projector, LM) state dicts in vistune's names."""
    vision: StateDict = {}
    projector: StateDict = {}
    lm: StateDict = {}
    unknown: list[str] = []
    for key, t in sd.items():
        new = key.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."))
        k = key[len("model."):] if new else key
        if k.startswith("vision_tower."):
            rest = k[len("vision_tower."):]
            cands = [rest, rest.removeprefix("vision_model."), f"vision_model.{rest}"]
            name = _resolve(cands, vision_keys)
            if name is None:
                unknown.append(key)
            else:
                vision[name] = t
        elif k.startswith("multi_modal_projector."):
            rest = k[len("multi_modal_projector."):]
            m = re.match(r"linear_([12])\.(weight|bias)$", rest)
            if not m:
                unknown.append(key)
                continue
            projector[f"{0 if m.group(1) == '1' else 2}.{m.group(2)}"] = t
        elif k.startswith("lm_head."):
            lm[f"{head}.{k[len('lm_head.'):]}"] = t
        elif k.startswith("language_model."):
            rest = k[len("language_model."):]
            if not new and rest.startswith("lm_head."):
                lm[f"{head}.{rest[len('lm_head.'):]}"] = t
                continue
            cands = [f"{lm_prefix}.{rest}"]
            if not new:  # the old layout nests the whole causal LM: language_model.model.X
                cands = [f"{lm_prefix}.{rest.removeprefix('model.')}", f"{lm_prefix}.{rest}", rest]
            name = _resolve(cands, lm_keys)
            if name is None:
                unknown.append(key)
            else:
                lm[name] = t
        elif k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; recomputed at load
        else:
            unknown.append(key)
    if unknown:
        raise InteropError(f"{source}: {len(unknown)} weight(s) that llava-hf does not define, e.g. {unknown[:4]}")
    return vision, projector, lm


def empty_models(vision_config, text_config) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Vision model and causal LM with the right shapes and no wasted initialisation."""
    with no_init_weights():
        vision = AutoModel.from_config(vision_config)
        lm = AutoModelForCausalLM.from_config(text_config)
    lm.tie_weights()  # not done under no_init_weights
    return vision, lm


def import_llava_hf(src: str | os.PathLike, *, template: str | None = None,
                    dtype: torch.dtype | None = None) -> Imported:
    """A llava-hf directory as a vistune model (weights unchanged, bit for bit)."""
    src = Path(src)
    notes: list[str] = []
    try:
        nxt = is_next_config(json.loads((src / "config.json").read_text()))
        cfg = (LlavaNextConfig if nxt else LlavaConfig).from_pretrained(str(src))
    except Exception as e:
        raise InteropError(f"{src / 'config.json'}: not a llava-hf config ({e})") from None
    if cfg.projector_hidden_act != "gelu" or not cfg.multimodal_projector_bias:
        raise InteropError(
            f"{src / 'config.json'}: projector_hidden_act={cfg.projector_hidden_act!r}, "
            f"multimodal_projector_bias={cfg.multimodal_projector_bias}; vistune's mlp2x_gelu projector is "
            "Linear(bias)-GELU-Linear(bias)"
        )
    if not isinstance(cfg.vision_feature_layer, int):
        raise InteropError(f"{src / 'config.json'}: vision_feature_layer {cfg.vision_feature_layer} (several "
                           "layers concatenated) is not supported; vistune takes one layer")
    meta_file = src / VISTUNE_META
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    except ValueError as e:
        raise InteropError(f"{meta_file}: not valid JSON ({e}); delete it to import without vistune's settings") from None
    if meta is not None and meta.get("tie_word_embeddings"):
        cfg.text_config.tie_word_embeddings = True  # exported untied for transformers' sake; tie again
    vision_model, lm = empty_models(cfg.vision_config, cfg.text_config)
    head = head_name(lm)
    sd = read_checkpoint(src)
    newline = take_newline(sd, str(src)) if nxt else {}
    vis_sd, proj_sd, lm_sd = split_llava_hf(sd, set(vision_model.state_dict()), set(lm.state_dict()),
                                            lm.base_model_prefix, head, str(src))
    load_exact(vision_model, vis_sd, f"{src} (vision tower)")
    load_exact(lm, lm_sd, f"{src} (language model)")
    tower = VisionTower(vision_model, cfg.vision_feature_layer)
    select = select_from_strategy(tower, cfg.vision_feature_select_strategy)

    if meta is not None:
        image = ImageConfig.from_dict(meta["image"])
        tpl = template or meta["template"]
        max_length = int(meta.get("max_length", DEFAULT_MAX_LENGTH))
        notes.append(f"settings from {meta_file.name} (written by vistune {meta.get('vistune_version', '?')})")
    else:
        image = image_config_from_processor(_read_processor_settings(src), tower.image_size, str(src))
        if nxt:
            image = anyres_image_config(image, cfg.image_grid_pinpoints, str(src / "config.json"))
        guessed = guess_template_name(_read_chat_template(src))
        tpl = template or guessed or DEFAULT_TEMPLATE
        max_length = DEFAULT_MAX_LENGTH
        if template is None:
            notes.append(f"template {tpl!r} ({'from the chat template' if guessed else 'default'}; "
                         "change with --template)")
    tok = read_tokenizer(src)
    in_vocab = tok.get_vocab().get("<image>")
    if in_vocab is not None and in_vocab != cfg.image_token_id:
        raise InteropError(f"{src}: tokenizer has <image> = {in_vocab} but config.json says "
                           f"image_token_index = {cfg.image_token_id}")
    settings = Settings("mlp2x_gelu", cfg.vision_feature_layer, select, tpl, image, max_length)
    model = assemble(settings, vision_model, lm, tok, proj_sd | newline, source=str(src), notes=notes, dtype=dtype)
    if model.image_token_id != cfg.image_token_id:
        raise InteropError(f"{src}: image token id {model.image_token_id} differs from config.json's "
                           f"{cfg.image_token_id}")
    return Imported(model, tok, "llava-hf", notes)


def _read_chat_template(src: Path) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        f = src / name
        if f.is_file():
            text = f.read_text()
            if name.endswith(".jinja"):
                return text
            ct = json.loads(text).get("chat_template")
            if isinstance(ct, str):
                return ct
    return None


# -- export ---------------------------------------------------------------------
def check_exportable(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase) -> tuple[str, int]:
    """Raise InteropError naming what llava-hf cannot express; returns (strategy, extra tokens)."""
    cfg = model.config
    if cfg.connector:
        raise InteropError(f"this model has a {cfg.connector['type']} connector, which llava-hf cannot express; "
                           "keep the vistune format (vistune's chat, serve and eval load it directly)")
    if cfg.projector_type != "mlp2x_gelu":
        raise InteropError(
            f"llava-hf's projector is Linear-GELU-Linear (mlp2x_gelu); this model's projector "
            f"{cfg.projector_type!r} cannot be expressed in it. Keep the vistune format (vistune's chat, "
            "serve and eval load it directly), or train with projector mlp2x_gelu to export to llava-hf"
        )
    lm = unwrap_peft(model.language_model)
    if hasattr(model.language_model, "peft_config"):
        raise InteropError("the language model carries an unmerged adapter; merge it first")
    bad = [k for k in _LOGIT_POSTPROCESSING if getattr(lm.config, k, None)]
    if bad:
        raise InteropError(f"the language model post-processes its logits ({bad}); llava-hf's plain lm_head "
                           "would give different outputs")
    out = lm.get_output_embeddings()
    if not isinstance(out, torch.nn.Linear) or out.bias is not None:
        raise InteropError(f"llava-hf needs an lm_head without bias; this LM has {out}")
    head, prefix = head_name(lm), lm.base_model_prefix
    stray = [k for k in lm.state_dict() if not k.startswith((f"{prefix}.", f"{head}."))]
    if stray:
        raise InteropError(f"the language model has weights outside its base model and head: {stray[:4]}")
    patch = getattr(model.vision.model.config, "patch_size", None)
    if not patch:
        kind = getattr(model.vision.model.config, "model_type", "?")
        raise InteropError(f"the vision tower is {kind!r} ({type(model.vision.model).__name__}), which has no "
                           "patch_size; llava-hf supports ViT towers (CLIP, SigLIP, ...), whose image tokens it "
                           "counts from the patch_size")
    if cfg.image.size != model.vision.image_size:
        raise InteropError(f"image size {cfg.image.size} differs from the vision tower's {model.vision.image_size}; "
                           "llava-hf's processor would feed the tower the wrong size")
    strategy, extra = feature_strategy(model.vision, cfg.vision_feature_select)
    side = model.vision.image_size // int(patch)
    expected = side * side + extra - (1 if strategy == "default" else 0)
    if expected != cfg.num_image_tokens:
        raise InteropError(f"llava-hf's processor would expand <image> into {expected} tokens but the vision "
                           f"tower gives {cfg.num_image_tokens}")
    tid = tokenizer.convert_tokens_to_ids("<image>")
    if tid != cfg.image_token_id:
        raise InteropError(f"tokenizer's <image> is {tid} but the model's image_token_id is {cfg.image_token_id}")
    return strategy, extra


def llava_hf_state_dict(model: VisionLanguageModel, key_layout: str = "old") -> StateDict:
    """vistune weights under llava-hf names (tied LM head left out, as transformers does)."""
    if key_layout not in KEY_LAYOUTS:
        raise InteropError(f"unknown key layout {key_layout!r}; one of {KEY_LAYOUTS}")
    new = key_layout == "new"
    lm = unwrap_peft(model.language_model)
    head, prefix = head_name(lm), lm.base_model_prefix
    nest = model.vision.model.config.model_type in _NESTED_VISION
    tied = tied_names(lm) if head_is_tied_by_name(lm) else set()
    out: StateDict = {}
    for k, t in model.vision.model.state_dict().items():
        if nest and not k.startswith("vision_model."):
            k = f"vision_model.{k}"
        out[("model." if new else "") + f"vision_tower.{k}"] = t
    for k, t in model.projector.state_dict().items():
        if k == NEWLINE:  # anyres: LLaVA-NeXT's own key (llava_next.py)
            continue
        idx, param = k.split(".", 1)
        out[("model." if new else "") + f"multi_modal_projector.linear_{1 if idx == '0' else 2}.{param}"] = t
    for k, t in lm.state_dict().items():
        if k.startswith(f"{head}."):
            if k in tied:
                continue
            out[("" if new else "language_model.") + f"lm_head.{k[len(head) + 1:]}"] = t
        else:
            rest = k[len(prefix) + 1:]
            out[f"model.language_model.{rest}" if new else f"language_model.model.{rest}"] = t
    return {k: v.detach() for k, v in out.items()}


def head_is_tied_by_name(lm: PreTrainedModel) -> bool:
    """Whether transformers' Llava re-ties a left-out lm_head (it looks for `embed_tokens`).

    LlavaForConditionalGeneration ties ``lm_head`` to ``language_model.embed_tokens``
    by name, so a tied LM that calls its embeddings otherwise (GPT-2's ``wte``) is
    exported untied, with the head written out.
    """
    if not getattr(lm.config, "tie_word_embeddings", False):
        return False
    emb = lm.get_input_embeddings()
    return any(mod is emb and name.endswith("embed_tokens") for name, mod in lm.named_modules())


def stop_token_ids(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the template's stop sequence when it is one token (e.g. <|im_end|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop = get_template(model.config.template).stop_string(tokenizer.eos_token or "</s>", tokenizer.bos_token or "")
    tid = tokenizer.convert_tokens_to_ids(stop.strip()) if stop.strip() else None
    if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
        ids.append(tid)
    return ids


def export_llava_hf(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, out: str | os.PathLike, *,
                    key_layout: str = "old", max_shard_size: str | int = "5GB") -> Path:
    """Write ``model`` as a llava-hf directory (atomically); returns its path. An anyres model is
    written as llava-hf's LLaVA-NeXT (`LlavaNextForConditionalGeneration`, llava_next.py)."""
    strategy, extra = check_exportable(model, tokenizer)
    cfg = model.config
    anyres = cfg.image.aspect == "anyres"
    lm = unwrap_peft(model.language_model)
    sd = llava_hf_state_dict(model, key_layout)
    if anyres:
        sd.update(newline_weights(model, key_layout))
    dtype = lm.get_input_embeddings().weight.dtype
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    text_config = lm.config.to_dict()
    if tied and not head_is_tied_by_name(lm):
        text_config["tie_word_embeddings"] = tied = False
    # vLLM builds the language model from text_config.architectures.
    text_config["architectures"] = [type(lm).__name__]
    config_kwargs = dict(
        vision_config=model.vision.model.config.to_dict(),
        text_config=text_config,
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    if anyres:
        llava_cfg = next_config(model, **config_kwargs)
    else:
        llava_cfg = LlavaConfig(**config_kwargs)
        llava_cfg.architectures = ["LlavaForConditionalGeneration"]
    llava_cfg.dtype = dtype
    tok = copy.deepcopy(tokenizer)  # the chat template is set on a copy, never on the caller's tokenizer
    chat_template = jinja_chat_template(cfg.template, tok)
    tok.chat_template = chat_template
    proc_kwargs = dict(patch_size=int(model.vision.model.config.patch_size), vision_feature_select_strategy=strategy,
                       num_additional_image_tokens=extra, chat_template=chat_template)
    if anyres:
        processor = next_processor(cfg.image, image_processor_kwargs(cfg.image), tok, **proc_kwargs)
    else:
        processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(**image_processor_kwargs(cfg.image)),
                                   tokenizer=tok, **proc_kwargs)
    image_processor = processor.image_processor
    stops = stop_token_ids(model, tok)
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                           eos_token_id=stops[0] if len(stops) == 1 else stops)
    meta = {k: v for k, v in cfg.to_dict().items() if k not in ("vision", "text")}
    meta["vistune_version"] = __version__
    meta["tie_word_embeddings"] = bool(getattr(lm.config, "tie_word_embeddings", False))
    with atomic_directory(out) as tmp:
        llava_cfg.save_pretrained(str(tmp))
        write_weights(sd, tmp, max_shard_size)
        gen.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        # Older transformers and other tools read the image settings from this file.
        (tmp / "preprocessor_config.json").write_text(image_processor.to_json_string())
        write_json(tmp / VISTUNE_META, meta)
    return Path(out)
