"""What a run writes and reads back: its checkpoints (save, restore on resume) and, at the end,
the trained model (whole, or LoRA adapters on their base) and the projector alone."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .. import __version__
from ..files import replace_directory, temp_path
from ..model.checkpoint import save_model
from ..model.unwrap import unwrap_peft
from . import checkpoints as ckpt
from .config import ConfigError, RunConfig
from .resume import run_settings
from .setup import RunSetup, whole_models
from .stages import PROJECTOR_FILE, modes_of, save_projector, trainable_state_dict

log = logging.getLogger("vistune.train")

MODEL_DIR = "model"


def save_checkpoint(s: RunSetup, cfg: RunConfig, out: Path, step: int, epoch: int, window: int,
                    bad: list[dict], cut: list[dict]) -> Path:
    """Checkpoint ``step`` (the next window to train: ``window`` of ``epoch``) into ``out``; every
    process calls it. Keeps the newest train.keep_last."""
    acc = s.acc
    from accelerate.utils import gather_object

    rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]
    path = ckpt.checkpoint_dir(out, step)
    state = {"step": step, "epoch": epoch, "window": window, "bad_records": bad, "cut_records": cut,
             "plan": s.plan_info, "settings": run_settings(cfg),
             "vistune_version": __version__, "processes": acc.num_processes, "sharded": s.sharded}
    if s.sharded:
        # DeepSpeed / FSDP shard weights and optimizer state over processes: every process
        # writes its shard (accelerate's save_state) into a temporary directory that the
        # main process renames once all are done.
        tmp = temp_path(path, tag="sharded")  # one name that every process agrees on
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "engine"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.write_loop_state(tmp, scheduler_state=s.scheduler.state_dict(), rng_states=rngs, state=state)
            replace_directory(tmp, path)
    elif acc.is_main_process:
        ckpt.save_checkpoint(path, trainable=trainable_state_dict(s.raw), optimizer_state=s.optimizer.state_dict(),
                             scheduler_state=s.scheduler.state_dict(), rng_states=rngs, state=state)
    if acc.is_main_process:
        ckpt.prune(out, cfg.train.keep_last)
    acc.wait_for_everyone()
    return path


def restore_checkpoint(s: RunSetup, path: Path) -> dict:
    """Put the weights, optimizer, schedule and RNGs of checkpoint ``path`` back into the run; returns
    its trainer state (step, bad and cut records). Refuses a checkpoint of another data plan."""
    acc = s.acc
    state = ckpt.read_state(path)
    diffs = {k: (state["plan"].get(k), v) for k, v in s.plan_info.items() if state["plan"].get(k) != v}
    if diffs:
        shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diffs.items())
        raise ConfigError(f"cannot resume from {path}: the data plan changed ({shown}); "
                          "use the original settings or a new output_dir")
    if state.get("sharded", False) != s.sharded:
        raise ConfigError(f"cannot resume from {path}: it was written "
                          f"{'with' if state.get('sharded') else 'without'} DeepSpeed/FSDP sharding")
    if s.sharded:
        acc.load_state(str(path / "engine"))
    else:
        ckpt.load_trainable(s.raw, path)
        s.optimizer.load_state_dict(ckpt.load_optimizer_state(path))
    s.scheduler.load_state_dict(ckpt.load_scheduler_state(path))
    rngs = ckpt.load_rng_states(path)
    rank = acc.process_index
    ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    if acc.is_main_process:
        log.info("resumed from %s (step %d)", path, state["step"])
    return state


def save_trained_model(s: RunSetup, cfg: RunConfig, out: Path) -> tuple[Path, Path | None, object]:
    """The trained model into ``out``/model (LoRA runs: adapters and what else learned, on their
    base) and, when asked, the projector alone; every process calls it. Returns the model
    directory, the projector file (or None) and the model as saved (a CPU copy when sharded)."""
    acc, t = s.acc, cfg.train
    main = acc.is_main_process
    acc.wait_for_everyone()
    model_dir = out / MODEL_DIR
    projector_path = None
    raw = s.raw
    if s.sharded:
        # Gather the full weights (ZeRO-3 / FSDP hold shards) into a CPU copy to save.
        full = acc.get_state_dict(s.model)
        if main:
            with whole_models(acc):
                raw = _cpu_copy(raw, full)
    if s.restore_attn is not None:
        # saved models load with the standard one
        unwrap_peft(raw.language_model).set_attn_implementation(s.restore_attn)
    if main:
        raw.eval()
        if s.lora_base is not None:
            from .lora import save_adapter_run

            save_adapter_run(raw, s.tokenizer, model_dir, s.lora_base, modes_of(raw, cfg))
        else:
            save_model(raw, s.tokenizer, model_dir)
        if t.save_projector and t.projector == "full":
            projector_path = save_projector(raw, out / PROJECTOR_FILE)
    acc.wait_for_everyone()
    return model_dir, projector_path, raw


def _cpu_copy(raw, state: dict):
    """A CPU model with the architecture of ``raw`` holding the gathered ``state``."""
    import copy

    from ..model.checkpoint import model_from_config

    if any(n for n in state if "lora_" in n):
        clone = copy.deepcopy(raw).cpu()
        clone.load_state_dict(state, strict=False)
        return clone
    clone = model_from_config(copy.deepcopy(raw.config), init=False)
    missing, unexpected = clone.load_state_dict(state, strict=False)
    tied = {n for n in missing if "lm_head" in n or "embed" in n}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered weights do not fit the model: missing {sorted(missing)[:4]}, "
                           f"unexpected {sorted(unexpected)[:4]}")
    clone.language_model.tie_weights()
    return clone
