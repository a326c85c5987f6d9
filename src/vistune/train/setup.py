"""What a run trains with, set up once before its first step: the accelerator, the output
directory, the model, the data set and its plan, the optimizer and schedule."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ..data.dataset import VLDataset
from ..hardware import bf16_support, has_accelerator
from ..model.checkpoint import save_model
from ..data.settings import TextSettings, text_settings_for
from . import checkpoints as ckpt
from .batches import TrainCollator
from .config import ConfigError, RunConfig, TrainConfig, check_paths
from .features import AUTOCAST_DTYPES, cached_dataset
from .optim import build_optimizer, build_scheduler, orthogonalization_dtype
from .packing import use_packed_attention
from .precision import mixed_precision
from .resume import check_settings
from .rundir import CONFIG_FILE, check_claim, claim, clean_interrupted_writes
from .sampler import BatchPlan
from .speedups import for_training
from .stages import apply_modes, build_model, compile_decoder, describe, module_of

log = logging.getLogger("vistune.train")


@dataclass
class RunSetup:
    """Everything the loop works with, as setup leaves it."""

    acc: object  # accelerate.Accelerator
    model: torch.nn.Module  # as accelerate prepared it (DDP / DeepSpeed / FSDP wrapped)
    raw: torch.nn.Module  # the VisionLanguageModel inside it
    tokenizer: object
    text: TextSettings  # template, length and image tokens, resolved once
    dataset: torch.utils.data.Dataset
    plan: BatchPlan
    total_steps: int
    collator: TrainCollator
    optimizer: torch.optim.Optimizer
    scheduler: object
    sharded: bool  # DeepSpeed / FSDP hold shards of the weights
    resumed_from: Path | None
    lora_base: Path | None  # the frozen base a LoRA run's adapters apply to
    restore_attn: str | None  # the attention implementation to put back before saving
    plan_info: dict  # the data plan a checkpoint records and a resume must match

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.raw.parameters() if p.requires_grad]

    def maybe_unused(self) -> list[torch.nn.Parameter]:
        """Trainable parameters that a text-only batch does not touch (the tower and projector)."""
        return [p for part in ("vision", "projector", "connector") for p in module_of(self.raw, part).parameters()
                if p.requires_grad]


def set_up(cfg: RunConfig, out: Path, resume: str | None, overwrite: bool) -> RunSetup:
    """Accelerator, output directory, model, data and optimizer, in the order a run needs them
    (the seed is set before the model is built, so that its random weights are the run's)."""
    from accelerate.utils import set_seed

    t = cfg.train
    check_paths(cfg)
    if overwrite and resuming(resume):
        raise ConfigError("--overwrite removes the checkpoints that --resume continues from: pass one of them")
    acc = make_accelerator(t, out)
    resumed_from = claim_output_dir(acc, cfg, out, resume, overwrite)
    sharded = check_sharding(acc.distributed_type, t)
    set_seed(t.seed)
    with whole_models(acc):
        model, tok = build_model(cfg)
    lora_base = _lora_base(acc, cfg, out, model, tok) if "lora" in (t.vision, t.llm, t.connector) else None
    apply_modes(model, cfg, compute_dtype=AUTOCAST_DTYPES.get(acc.mixed_precision, torch.float32), device=acc.device)
    # speed-ups that keep the maths: switched on here, and nowhere else
    restore_attn = use_packed_attention(model.language_model) if cfg.data.packing else None
    if t.compile:
        restore_attn = compile_decoder(model, acc.device) or restore_attn
    model = for_training(model)  # the same modules, trained with train/speedups.py

    # build_model wrote data.template / data.max_length into the model's config: it is the one source
    text = text_settings_for(model.config, tok, system=cfg.data.system, max_image_tokens=cfg.data.max_image_tokens)
    dataset = _dataset(cfg, model, text, acc)
    n = len(dataset)
    if n == 0:
        raise ConfigError(f"data.train: {cfg.data.train} holds no records")
    lengths = dataset.modality_lengths() if cfg.data.group_by_length else None
    plan = BatchPlan(n, t.batch_size, acc.num_processes, t.grad_accum, t.seed, cfg.data.shuffle, lengths,
                     cfg.data.group_by_length)
    total = t.max_steps or plan.steps_per_epoch * t.epochs
    collator = TrainCollator(tok.pad_token_id, cfg.data.packing, cfg.data.pack_length or text.max_length)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, t, total)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(acc, t)
    model, optimizer = acc.prepare(model, optimizer)
    plan_info = {"num_samples": n, "global_batch": plan.window_size, "micro_batch": plan.micro_size,
                 "grad_accum": t.grad_accum, "seed": t.seed, "shuffle": cfg.data.shuffle,
                 "group_by_length": cfg.data.group_by_length, "total_steps": total}
    return RunSetup(acc, model, acc.unwrap_model(model), tok, text, dataset, plan, total, collator, optimizer,
                    scheduler, sharded, resumed_from, lora_base, restore_attn, plan_info)


def log_model(s: RunSetup, cfg: RunConfig) -> None:
    """What trains, and in which precision Muon orthogonalises (main process)."""
    if not s.acc.is_main_process:
        return
    log.info("model: %s", describe(s.raw, cfg))
    if cfg.train.optimizer == "muon":
        dtype, why = orthogonalization_dtype(s.acc.device)
        log.info("muon: Newton-Schulz orthogonalisation in %s (%s)", str(dtype).removeprefix("torch."), why)


def _dataset(cfg: RunConfig, model, text: TextSettings, acc):
    d = cfg.data
    if not d.train:
        raise ConfigError("data.train (a LLaVA JSON/JSONL file) is required")
    if d.feature_cache is not None:
        return cached_dataset(cfg, model, text, acc)
    return VLDataset(d.train, text, d.images, model.config.image, cache_tokens=d.cache_tokens)


def _lora_base(acc, cfg: RunConfig, out: Path, model, tok) -> Path:
    """The frozen base of a LoRA run: model.from, or a copy written once into the run."""
    if cfg.model.from_ is not None:
        return Path(cfg.model.from_).resolve()
    base = out / "base"
    if acc.is_main_process and not (base / "config.json").exists():
        save_model(model, tok, base)
    acc.wait_for_everyone()
    return base.resolve()


# -- the accelerator ---------------------------------------------------------------------
def check_sharding(kind: DistributedType, t: TrainConfig) -> bool:
    """Whether ``kind`` shards the model (DeepSpeed, FSDP); refuses what sharding breaks.

    Called before the model is built, so a refused setting costs no loading time."""
    sharded = kind in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if sharded and t.compile:
        raise ConfigError("train.compile compiles the LM in this process; DeepSpeed and FSDP wrap it in their "
                          "own engines: leave train.compile off there")
    if sharded and t.optimizer != "adamw":
        raise ConfigError(f"train.optimizer {t.optimizer} needs whole matrices, which DeepSpeed and FSDP shard: "
                          "use train.optimizer: adamw there, or DDP (configs/accelerate/ddp.yaml)")
    return sharded


def make_accelerator(t: TrainConfig, out: Path):
    """accelerate's Accelerator for this run, refusing what this machine cannot do."""
    from accelerate import Accelerator

    from accelerate.state import AcceleratorState, GradientState

    _check_trackers(t.report_to)
    # accelerate keeps one process-wide state; a second run in the same process (stage 1
    # then stage 2, a notebook) may want another precision. The process group stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    acc = Accelerator(
        # cpu=True when there is no accelerator: accelerate only sets up multi-process CPU
        # (gloo) runs under torchrun / `accelerate launch` when told so.
        # (DeepSpeed / FSDP launches set up their own process groups.)
        cpu=not has_accelerator() and not _sharded_launch(),
        mixed_precision=mixed_precision(t.precision, device_type),
        log_with=list(t.report_to) or None,
        project_dir=str(out),
    )
    if acc.device.type == "cpu" and acc.mixed_precision == "fp16":
        raise ConfigError("train.precision=fp16 is not supported on CPU; use bf16 or fp32")
    if acc.device.type == "cpu" and acc.mixed_precision == "bf16" and not bf16_support()[0]:
        log.warning("train.precision=bf16, but bf16 is emulated here (%s): it runs several times slower than "
                    "fp32", bf16_support()[1])
    if _launch_flag("ACCELERATE_USE_FSDP") and acc.distributed_type != DistributedType.FSDP:
        # accelerate shards with FSDP only on GPUs (and other accelerators); on a CPU it quietly
        # sets up nothing, and every launched process would train alone as "rank 0".
        raise ConfigError(f"an FSDP launch, but accelerate set up {acc.distributed_type.value} on "
                          f"{acc.device.type}: FSDP needs GPUs. On CPUs, launch with "
                          "configs/accelerate/ddp.yaml (or DeepSpeed) instead")
    return acc


def _check_trackers(names: list[str]) -> None:
    need = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    for n in names:
        if not any(importlib.util.find_spec(m) for m in need[n]):
            raise ConfigError(f"train.report_to: {n} is not installed (pip install {need[n][0]})")


def fill_deepspeed_config(acc, t: TrainConfig) -> None:
    """Fill the DeepSpeed JSON's "auto" entries from the run config.

    vistune marks accumulation boundaries itself (windows can be short at an epoch's
    end), so DeepSpeed sees an accumulation of 1 and steps when told.
    """
    c = acc.state.deepspeed_plugin.deepspeed_config
    c["train_micro_batch_size_per_gpu"] = t.batch_size
    c["gradient_accumulation_steps"] = 1
    c["train_batch_size"] = t.batch_size * acc.num_processes
    c["gradient_clipping"] = float(t.max_grad_norm or 0.0)
    zero = c.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero[key] = int(5e8) if key != "stage3_param_persistence_threshold" else int(1e6)


@contextlib.contextmanager
def whole_models(acc):
    """Build whole models even under ZeRO-3 (it partitions them at prepare).

    accelerate registers the DeepSpeed config with transformers, which then creates
    ZeRO-3 models already partitioned; building runs the tower once to count its
    tokens, which partitioned parameters cannot do.
    """
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _launch_flag(name: str) -> bool:
    """A switch that `accelerate launch` sets in the environment of the processes it starts."""
    return os.environ.get(name, "").lower() == "true"


def _sharded_launch() -> bool:
    return _launch_flag("ACCELERATE_USE_DEEPSPEED") or _launch_flag("ACCELERATE_USE_FSDP")


# -- the output directory ---------------------------------------------------------------------
def resuming(resume: str | None) -> bool:
    return resume not in (None, "", "none", False)


def resume_path(resume: str | None, out: Path) -> Path | None:
    """The checkpoint ``resume`` ("auto" or a path) names, or None."""
    if not resuming(resume):
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(out)
    p = Path(resume)
    if not (p / ckpt.STATE_FILE).exists():
        raise ConfigError(f"train.resume: {p} is not a complete checkpoint (no {ckpt.STATE_FILE})")
    return p


def claim_output_dir(acc, cfg: RunConfig, out: Path, resume: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (if any), once ``out`` is this run's: cleared of what
    interrupted writes left, refused if it holds another run, emptied of it with ``overwrite``."""
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_interrupted_writes(out)
    acc.wait_for_everyone()
    path = resume_path(resume, out)
    if path is not None:
        kind = "inside" if path.resolve().parent.parent == out.resolve() else "elsewhere"
    else:
        kind = "nothing" if resuming(resume) else None
    # Every process checks (the same files), so that a refusal stops them all rather than one.
    check_claim(out, resume=kind, overwrite=overwrite)
    if path is not None:
        check_settings(path, ckpt.read_state(path).get("settings"), cfg)
    acc.wait_for_everyone()
    if acc.is_main_process:
        claim(out, resume=kind, overwrite=overwrite)
        # First of the run's files, so that a run stopped at any point leaves its mark. It records what
        # the run is, not how it started: the file resumes without removing the run.
        replace(cfg, train=replace(cfg.train, overwrite=False)).save(out / CONFIG_FILE)
    acc.wait_for_everyone()
    return path
