"""The typed configuration of a training run, loaded from YAML presets plus overrides.

A run is ``RunConfig(model, data, train, lora, output_dir)``. Presets in ``configs/``
are YAML files with the same nesting; ``key=value`` overrides use dotted keys
(``train.lr=1e-3``, ``model.llm.hidden_size=128``) and YAML values
(``data.packing=true``, ``lora.target_modules=[q_proj,v_proj]``). Unknown keys are
errors that name the key, so a typo never silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..files import atomic_write_text

MODULE_MODES = ("frozen", "full", "lora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
IMAGE_ASPECTS = ("pad", "resize", "crop", "anyres")


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the key."""


@dataclass
class ModelSpec:
    """Where the model comes from.

    Either ``from`` (a vistune model directory, e.g. a stage-1 output) or ``vision`` +
    ``llm`` (local checkpoint directories, or inline Hugging Face config dicts for tiny
    models trained from scratch; then ``tokenizer`` is required).
    """

    from_: str | None = None
    vision: str | dict | None = None
    llm: str | dict | None = None
    tokenizer: str | None = None
    projector: str | None = None  # projector type (linear, mlp2x_gelu, ...); default mlp2x_gelu
    projector_from: str | None = None  # projector-only safetensors written by a stage-1 run
    # A compressing connector before the projector (qformer | resampler): each image is num_queries tokens.
    connector: str | None = None
    num_queries: int = 32
    connector_options: dict | None = None  # Blip2QFormerConfig keys, or the resampler's (hidden_size, depth, heads)
    connector_from: str | None = None  # a BLIP-2 checkpoint directory: its Q-Former, queries and ln_vision
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"
    image_aspect: str = "pad"  # anyres: LLaVA-NeXT's tiles on the best of image_grid_pinpoints (docs/anyres.md)
    image_grid_pinpoints: list | str | None = None  # [[width, height], ...] px or "(1x1),...,(3x3)"; default 1.6's
    max_tiles: int | None = None  # anyres: grids of more tiles are never chosen


@dataclass
class DataConfig:
    train: str | None = None  # LLaVA JSON / JSONL file
    images: str | None = None  # folder the records' image paths are relative to
    template: str | None = None  # default: the model's template (vicuna_v1 for new models)
    system: str | None = None
    max_length: int | None = None  # default: the model's max_length
    max_image_tokens: int | None = None  # a sample's images together at most (anyres, many images); over it: refused
    num_workers: int = 0
    shuffle: bool = True
    group_by_length: bool = False  # LLaVA's group_by_modality_length
    packing: bool = False  # several samples per row, no attention across them
    pack_length: int | None = None  # tokens per packed row; default max_length
    feature_cache: str | None = None  # folder of cached vision features, or "auto" (OUTPUT_DIR/feature_cache)
    # Keep each sample's token ids in memory after its first epoch (small sets, many epochs). Kept in
    # the process that encodes: with data.num_workers > 0, each epoch's fresh workers start empty.
    cache_tokens: bool = False


@dataclass
class TrainConfig:
    # What learns: frozen | full | lora, per module.
    vision: str = "frozen"
    projector: str = "full"
    llm: str = "full"
    connector: str | None = None  # the connector's mode (models with one); default: as train.projector
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    lr: float = 2e-5
    vision_lr: float | None = None  # per-module learning rates; default train.lr
    projector_lr: float | None = None
    connector_lr: float | None = None
    llm_lr: float | None = None
    batch_size: int = 8  # per process; global batch = batch_size x grad_accum x processes
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    # wsd (warmup-stable-decay): the peak rate until the last decay_ratio of the steps, then linear to 0.
    # A rate held high lets late-forming circuits form; the short decay still anneals.
    decay_ratio: float = 0.2
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | muon (Muon on the linear layers' matrices, AdamW on the rest)
    muon_lr: float | None = None  # rate of the matrices Muon updates; default: their module's rate
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 42
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 on CPU
    gradient_checkpointing: bool = False
    # torch.compile (inductor) on the LM's decoder layers, one graph for all layers of one class.
    # Small models on a CPU spend much of a step in per-op overhead that compiling fuses away; the
    # first step pays the compile (measured: docs/benchmarks.md).
    compile: bool = False
    save_every: int = 0  # optimizer steps between checkpoints; 0: no intermediate checkpoints
    keep_last: int = 2
    resume: str | None = None  # "auto" (newest checkpoint of output_dir) or a checkpoint path
    overwrite: bool = False  # remove the files of an earlier run in output_dir first (else such a folder is refused)
    max_bad_records: float = 0.01  # >= 1: a count; < 1: a fraction of the data set
    save_projector: bool = True  # also write OUTPUT_DIR/projector.safetensors when the projector learns
    log_every: int = 1
    progress: bool = True
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb


@dataclass
class LoraSpec:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # every nn.Linear except lm_head
    bits: int = 16  # 4 or 8: QLoRA through bitsandbytes


@dataclass
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    output_dir: str = "runs/vistune"

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d, "")

    def with_overrides(self, overrides: list[str] | dict) -> "RunConfig":
        d = self.to_dict()
        apply_overrides(d, overrides)
        return RunConfig.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# YAML names that are not Python identifiers.
_YAML_NAMES = {"from_": "from"}
_FIELD_NAMES = {v: k for k, v in _YAML_NAMES.items()}


PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    """The YAML presets shipped with vistune (what `vistune train NAME` accepts)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(path: str | os.PathLike) -> Path:
    """A config file: the path itself when it exists, else a shipped preset of that name
    (`tiny-cpu-stage1` or `tiny-cpu-stage1.yaml`), so presets work from a pip install too."""
    p = Path(path)
    if p.exists():
        return p
    if str(p.parent) in (".", "configs"):  # `configs/NAME.yaml` as in the docs, run from anywhere
        shipped = PRESETS_DIR / (p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml")
        if shipped.exists():
            return shipped
    raise ConfigError(f"config file not found: {p} (shipped presets: {', '.join(preset_names())})")


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """A RunConfig from a YAML preset (optional) and ``key=value`` overrides."""
    d: dict = {}
    if path is not None:
        p = resolve_preset(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        d = loaded
    if overrides:
        apply_overrides(d, overrides)
    return RunConfig.from_dict(d)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(d: dict, overrides: list[str] | dict) -> dict:
    """Set dotted keys in the nested dict ``d`` (in place). Key checks happen at typing."""
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".")
        node = d
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None or not isinstance(nxt, dict):
                if nxt is not None and not isinstance(nxt, dict):
                    where = ".".join(parts[: i + 1])
                    raise ConfigError(f"cannot set {key!r}: {where!r} is {nxt!r}, not a mapping")
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return d


# -- typing -------------------------------------------------------------------------
def _from_dict(cls, d: Any, prefix: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__} {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        name = _FIELD_NAMES.get(key, key)
        full = f"{prefix}{key}"
        if name not in names or key in _YAML_NAMES:
            known = sorted(_YAML_NAMES.get(n, n) for n in names)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {(prefix + close[0])!r}? " if close else ""
            raise ConfigError(f"unknown config key {full!r} ({hint}known keys here: {', '.join(known)})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{full}.")
        else:
            kwargs[name] = _coerce(value, hint, full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check / convert ``value`` to the annotated type; errors name the key."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: a value is required")
    errors = []
    for opt in options:
        if opt is type(None):
            continue
        try:
            return _coerce_one(value, opt)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    expected = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _coerce_one(value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ) or (Any,)
        if isinstance(value, str):
            # "a,b" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        return [v if inner is Any else _coerce_one(v, inner) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError("not a bool")
    if typ is int:
        if isinstance(value, bool):
            raise TypeError("bool is not int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value)
        raise TypeError("not an int")
    if typ is float:
        if isinstance(value, bool):
            raise TypeError("bool is not float")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        raise TypeError("not a float")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError("not a string")
    if typ is dict:
        if isinstance(value, dict):
            return value
        raise TypeError("not a mapping")
    raise TypeError(f"unsupported type {typ}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(t: Any) -> str:
    if t is type(None):
        return "null"
    return getattr(t, "__name__", str(t))


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_YAML_NAMES.get(f.name, f.name): _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


# -- checks across keys ------------------------------------------------------------
def validate(cfg: RunConfig) -> None:
    m, t, data, lora = cfg.model, cfg.train, cfg.data, cfg.lora
    if m.from_ is not None and (m.vision is not None or m.llm is not None):
        raise ConfigError("model.from cannot be combined with model.vision / model.llm (pick one way to get a model)")
    if m.from_ is None and (m.vision is None) != (m.llm is None):
        missing = "model.llm" if m.llm is None else "model.vision"
        raise ConfigError(f"{missing} is required when building a model from parts (or use model.from)")
    if isinstance(m.llm, dict) and not m.tokenizer:
        raise ConfigError("model.tokenizer (a tokenizer directory) is required when model.llm is an inline config")
    for part in ("vision", "llm"):
        v = getattr(m, part)
        if isinstance(v, dict) and "model_type" not in v:
            raise ConfigError(f"model.{part}: an inline config needs a 'model_type'")
    if m.projector is not None:
        from ..model.config import check_projector_type

        try:
            check_projector_type(m.projector)
        except ValueError as e:
            raise ConfigError(f"model.projector: {e}") from None
    if m.connector is not None or m.connector_from is not None:
        from ..model.connectors import CONNECTOR_TYPES, check_options

        if m.connector is not None and m.connector not in CONNECTOR_TYPES:
            raise ConfigError(f"model.connector must be one of {', '.join(CONNECTOR_TYPES)}, got {m.connector!r}")
        try:
            check_options(m.connector or "qformer", m.connector_options or {})
        except ValueError as e:
            raise ConfigError(f"model.connector_options: {e}") from None
        if m.connector_from is not None and m.connector not in (None, "qformer"):
            raise ConfigError(f"model.connector_from (a BLIP-2 directory) gives a qformer, not a {m.connector}")
        if m.from_ is not None:
            raise ConfigError("model.connector / model.connector_from build a new model: the model of "
                              "model.from keeps its own connector")
    if m.connector_options and (m.connector is None or m.connector_from is not None):
        raise ConfigError("model.connector_options shape a new connector: set model.connector, and no "
                          "model.connector_from (a BLIP-2 checkpoint brings its own shape)")
    if m.num_queries < 1:
        raise ConfigError(f"model.num_queries must be >= 1, got {m.num_queries}")
    if data.template is not None:
        from ..text.templates import get_template

        try:
            get_template(data.template)
        except ValueError as e:
            raise ConfigError(f"data.template: {e}") from None
    if t.overwrite and t.resume not in (None, "", "none"):
        raise ConfigError("train.overwrite removes the checkpoints that train.resume continues from: set one of them")
    if m.image_aspect not in IMAGE_ASPECTS:
        raise ConfigError(f"model.image_aspect must be one of {', '.join(IMAGE_ASPECTS)}, got {m.image_aspect!r}")
    if m.image_aspect != "anyres" and (m.image_grid_pinpoints is not None or m.max_tiles is not None):
        raise ConfigError("model.image_grid_pinpoints and model.max_tiles need model.image_aspect=anyres")
    if m.max_tiles is not None and m.max_tiles < 1:
        raise ConfigError(f"model.max_tiles must be >= 1, got {m.max_tiles}")
    for key in ("max_length", "pack_length", "max_image_tokens"):
        v = getattr(data, key)
        if v is not None and v < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {v}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if t.max_grad_norm is not None and t.max_grad_norm < 0:
        raise ConfigError(f"train.max_grad_norm must be >= 0 (0 or null: no clipping), got {t.max_grad_norm}")
    if m.vision_feature_select not in ("patch", "cls_patch"):
        raise ConfigError(f"model.vision_feature_select must be patch or cls_patch, got {m.vision_feature_select!r}")
    for part in ("vision", "projector", "connector", "llm"):
        mode = getattr(t, part)
        if part == "connector" and mode is None:
            continue
        if mode not in MODULE_MODES:
            raise ConfigError(f"train.{part} must be one of {', '.join(MODULE_MODES)}, got {mode!r}")
    if t.projector == "lora":
        raise ConfigError("train.projector cannot be lora (the projector is small: train it fully or freeze it)")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be {' or '.join(OPTIMIZERS)}, got {t.optimizer!r}")
    if t.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {t.scheduler!r}")
    for key in ("batch_size", "grad_accum", "epochs", "keep_last", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1, got {t.max_steps}")
    if t.save_every < 0:
        raise ConfigError(f"train.save_every must be >= 0, got {t.save_every}")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if not 0 < t.decay_ratio <= 1:
        raise ConfigError(f"train.decay_ratio must be in (0, 1], got {t.decay_ratio}")
    if t.scheduler == "wsd" and t.warmup_ratio + t.decay_ratio > 1:
        raise ConfigError(f"train.decay_ratio {t.decay_ratio} leaves no room for the warmup "
                          f"(warmup_ratio {t.warmup_ratio}): their sum must be <= 1 with the wsd scheduler")
    if t.max_bad_records < 0:
        raise ConfigError(f"train.max_bad_records must be >= 0, got {t.max_bad_records}")
    for key in ("lr", "vision_lr", "projector_lr", "llm_lr", "muon_lr"):
        v = getattr(t, key)
        if v is not None and v < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {v}")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas must be two numbers, got {t.adam_betas}")
    for r in t.report_to:
        if r not in ("tensorboard", "wandb"):
            raise ConfigError(f"train.report_to: unknown tracker {r!r} (tensorboard, wandb)")
    if not any(getattr(t, p) not in ("frozen", None) for p in ("vision", "projector", "connector", "llm")):
        raise ConfigError("train.vision, train.projector and train.llm are all frozen: nothing would learn")
    if lora.bits not in (4, 8, 16):
        raise ConfigError(f"lora.bits must be 4, 8 or 16, got {lora.bits}")
    if lora.r < 1:
        raise ConfigError(f"lora.r must be >= 1, got {lora.r}")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {data.num_workers}")
    if data.feature_cache is not None and t.vision != "frozen":
        raise ConfigError(
            f"data.feature_cache needs a frozen vision tower (train.vision is {t.vision!r}): "
            "cached features would go stale as the tower learns"
        )


def check_paths(cfg: RunConfig, data: bool = True) -> None:
    """The files and folders a run reads (the model's; with ``data``, the data's too) must be there: checked
    when it starts, not at load, so that a preset naming an earlier stage's output loads before that runs."""
    m, d = cfg.model, cfg.data
    wanted = [("model.from", m.from_, "dir"), ("model.tokenizer", m.tokenizer, "dir"),
              ("model.projector_from", m.projector_from, "file")]
    if data:
        wanted += [("data.train", d.train, "file"), ("data.images", d.images, "dir")]
    wanted += [(f"model.{part}", getattr(m, part), "dir") for part in ("vision", "llm")
               if isinstance(getattr(m, part), str)]
    for key, value, kind in wanted:
        if value is None:
            continue
        p = Path(value)
        if not p.exists():
            raise ConfigError(f"{key}: {'folder' if kind == 'dir' else 'file'} not found: {value}")
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{key}: {value} is a file, not a folder")
        if kind == "file" and p.is_dir():
            raise ConfigError(f"{key}: {value} is a folder, not a file")


def module_mode(t: TrainConfig, part: str) -> str:
    """frozen | full | lora of vision, projector, connector or llm (the connector follows the projector unless set)."""
    mode = getattr(t, part)
    return t.projector if mode is None else mode


def module_lr(t: TrainConfig, part: str) -> float:
    v = getattr(t, f"{part}_lr")
    return t.lr if v is None else v
