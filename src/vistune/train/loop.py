"""One training loop for both stages, on accelerate (1 CPU process to many GPUs).

Every optimizer step averages the loss over the supervised tokens of the whole
global batch (all micro-batches of the accumulation window, all processes), so
gradient accumulation and data parallelism give the same update as one big batch.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from accelerate.utils import DistributedType

from .. import __version__
from ..data.dataset import VLDataset, text_settings_for
from ..files import replace_directory, temp_path, write_jsonl
from ..hardware import bf16_support, keep_freed_memory
from ..model.checkpoint import save_model
from ..model.unwrap import unwrap_peft
from . import checkpoints as ckpt
from .batches import SkipBad, TrainCollator, model_inputs, supervised_tokens
from .config import ConfigError, RunConfig, TrainConfig, check_paths
from .features import AUTOCAST_DTYPES, cached_dataset
from .metrics import CURVE_FILE, METRICS_FILE, SUMMARY_FILE, MetricsLog, plot_loss, read_metrics, write_summary
from .optim import build_optimizer, build_scheduler, orthogonalization_dtype
from .packing import use_packed_attention
from .precision import mixed_precision
from .resume import check_settings, run_settings
from .rundir import BAD_RECORDS_FILE, CONFIG_FILE, CUT_RECORDS_FILE, check_claim, claim, clean_interrupted_writes
from .sampler import BatchPlan
from .stages import (MODULES, PROJECTOR_FILE, apply_modes, build_model, compile_decoder, describe, save_projector,
                     set_train_mode, trainable_state_dict)

log = logging.getLogger("vistune.train")

SHOWN_CUTS = 5  # cuts (and bad records found before the first step) named as they happen; the files list them all


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


class TooManyBadRecords(RuntimeError):
    """More records failed than ``train.max_bad_records`` allows; names them."""

    def __init__(self, bad: list[dict], limit: float, total: int):
        self.bad = bad
        shown = ", ".join(f"{b['id']!r} ({b['reason']})" for b in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        super().__init__(
            f"{len(bad)} bad records of {total}, over the {int(limit)} that train.max_bad_records allows: "
            f"{shown}{more}. "
            "Fix or remove them (vistune data validate), or raise train.max_bad_records"
        )


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    final_loss: float
    first_loss: float
    steps: int
    metrics_path: Path
    loss_curve: Path | None = None
    summary_path: Path | None = None
    projector_path: Path | None = None
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    bad_records: list[dict] = field(default_factory=list)
    cut_records: list[dict] = field(default_factory=list)  # trained, but shortened to data.max_length
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    main_process: bool = True  # False on the other processes of a distributed run


def run(config: RunConfig, resume: str | None = None, overwrite: bool | None = None,
        on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train as ``config`` says; returns where the model and metrics went.

    ``resume`` ("auto" or a checkpoint path) overrides ``config.train.resume``, ``overwrite``
    ``config.train.overwrite`` (remove an earlier run's files from ``output_dir`` first).
    ``on_step`` is called on the main process after every optimizer step with that step's
    record: the fields of ``metrics.jsonl`` plus ``total_steps``.
    """
    return Trainer(config, resume=resume, overwrite=overwrite, on_step=on_step).train()


def _check_trackers(names: list[str]) -> None:
    need = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    for n in names:
        if not any(importlib.util.find_spec(m) for m in need[n]):
            raise ConfigError(f"train.report_to: {n} is not installed (pip install {need[n][0]})")


class Trainer:
    def __init__(self, config: RunConfig, resume: str | None = None, overwrite: bool | None = None,
                 on_step: Callable[[dict], None] | None = None):
        self.cfg = config
        self.on_step = on_step
        self.resume = resume if resume is not None else config.train.resume
        self.overwrite = overwrite if overwrite is not None else config.train.overwrite
        self.out = Path(config.output_dir)

    # -- setup -----------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator

        from accelerate.state import AcceleratorState, GradientState

        t = self.cfg.train
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
            cpu=not _has_accelerator() and not _sharded_launch(),
            mixed_precision=mixed_precision(t.precision, device_type),
            log_with=list(t.report_to) or None,
            project_dir=str(self.out),
        )
        if acc.device.type == "cpu" and acc.mixed_precision == "fp16":
            raise ConfigError("train.precision=fp16 is not supported on CPU; use bf16 or fp32")
        if acc.device.type == "cpu":
            keep_freed_memory()  # each step allocates the same activations again (hardware.py)
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

    def _dataset(self, model, tok, acc):
        d = self.cfg.data
        if not d.train:
            raise ConfigError("data.train (a LLaVA JSON/JSONL file) is required")
        text = text_settings_for(model.config, tok, template=d.template, max_length=d.max_length, system=d.system,
                                 max_image_tokens=d.max_image_tokens)
        if d.feature_cache is not None:
            return cached_dataset(self.cfg, model, text, acc)
        return VLDataset(d.train, text, d.images, model.config.image, cache_tokens=d.cache_tokens)

    def _resume_path(self) -> Path | None:
        if not self._resuming():
            return None
        if self.resume == "auto":
            return ckpt.latest_checkpoint(self.out)
        p = Path(self.resume)
        if not (p / ckpt.STATE_FILE).exists():
            raise ConfigError(f"train.resume: {p} is not a complete checkpoint (no {ckpt.STATE_FILE})")
        return p

    def _resuming(self) -> bool:
        return self.resume not in (None, "", "none", False)

    def _claim_output_dir(self) -> Path | None:
        """The checkpoint to resume from (if any), once ``output_dir`` is this run's: cleared of what
        interrupted writes left, refused if it holds another run, emptied of it with ``overwrite``."""
        acc = self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_interrupted_writes(self.out)
        acc.wait_for_everyone()
        path = self._resume_path()
        if path is not None:
            kind = "inside" if path.resolve().parent.parent == self.out.resolve() else "elsewhere"
        else:
            kind = "nothing" if self._resuming() else None
        # Every process checks (the same files), so that a refusal stops them all rather than one.
        check_claim(self.out, resume=kind, overwrite=self.overwrite)
        if path is not None:
            check_settings(path, ckpt.read_state(path).get("settings"), self.cfg)
        acc.wait_for_everyone()
        if acc.is_main_process:
            claim(self.out, resume=kind, overwrite=self.overwrite)
            # First of the run's files, so that a run stopped at any point leaves its mark. It records what
            # the run is, not how it started: the file resumes without removing the run.
            replace(self.cfg, train=replace(self.cfg.train, overwrite=False)).save(self.out / CONFIG_FILE)
        acc.wait_for_everyone()
        return path

    # -- the run ---------------------------------------------------------------
    def train(self) -> TrainResult:
        from accelerate.utils import set_seed

        cfg, t = self.cfg, self.cfg.train
        check_paths(cfg)
        if self.overwrite and self._resuming():
            raise ConfigError("--overwrite removes the checkpoints that --resume continues from: pass one of them")
        acc = self._accelerator()
        self.acc = acc
        main = acc.is_main_process
        resumed_from = self._claim_output_dir()

        self.sharded = check_sharding(acc.distributed_type, t)
        set_seed(t.seed)
        with _whole_models(acc):
            model, tok = build_model(cfg)
        lora_base = self._lora_base(model, tok) if "lora" in (t.vision, t.llm) else None
        apply_modes(model, cfg, compute_dtype=AUTOCAST_DTYPES.get(acc.mixed_precision, torch.float32),
                    device=acc.device)
        restore_attn = use_packed_attention(model.language_model) if cfg.data.packing else None
        if t.compile:
            restore_attn = compile_decoder(model, acc.device) or restore_attn
        dataset = self._dataset(model, tok, acc)
        n = len(dataset)
        if n == 0:
            raise ConfigError(f"data.train: {cfg.data.train} holds no records")
        lengths = dataset.modality_lengths() if cfg.data.group_by_length else None
        plan = BatchPlan(n, t.batch_size, acc.num_processes, t.grad_accum, t.seed, cfg.data.shuffle, lengths,
                         cfg.data.group_by_length)
        steps_per_epoch = plan.steps_per_epoch
        total = t.max_steps or steps_per_epoch * t.epochs
        pack_len = cfg.data.pack_length or cfg.data.max_length or model.config.max_length
        collator = TrainCollator(tok.pad_token_id, cfg.data.packing, pack_len)

        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, t, total)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            _fill_deepspeed_config(acc, t)
        model, optimizer = acc.prepare(model, optimizer)
        raw = acc.unwrap_model(model)

        plan_info = {"num_samples": n, "global_batch": plan.window_size, "micro_batch": plan.micro_size,
                     "grad_accum": t.grad_accum, "seed": t.seed, "shuffle": cfg.data.shuffle,
                     "group_by_length": cfg.data.group_by_length, "total_steps": total}
        step, bad, cut = 0, {}, {}
        if resumed_from is not None:
            step, bad, cut = self._restore(resumed_from, raw, optimizer, scheduler, plan_info)
        bad_limit = t.max_bad_records if t.max_bad_records >= 1 else t.max_bad_records * n
        self._check_records(dataset, bad, bad_limit, n)

        if main:
            log.info("model: %s", describe(raw, cfg))
            if t.optimizer == "muon":
                dtype, why = orthogonalization_dtype(acc.device)
                log.info("muon: Newton-Schulz orthogonalisation in %s (%s)", str(dtype).removeprefix("torch."), why)
        if t.report_to:
            acc.init_trackers("vistune", config=_flat(cfg.to_dict()))
        metrics = MetricsLog(self.out / METRICS_FILE, resume_step=step if resumed_from else None) if main else None
        trainable = [p for p in raw.parameters() if p.requires_grad]
        maybe_unused = [p for part in ("vision", "projector") for p in _module(raw, part).parameters() if p.requires_grad]

        progress = None
        if main and t.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
        start_time = time.perf_counter()
        tokens_done, first_loss, last_loss, last_saved = 0, None, float("nan"), None
        max_length = dataset.text.max_length
        try:
            set_train_mode(raw, cfg)
            while step < total:
                epoch, w0 = divmod(step, steps_per_epoch)
                windows = plan.rank_windows(epoch, acc.process_index)[w0:]
                loader = DataLoader(
                    SkipBad(dataset), batch_sampler=[mb for win in windows for mb in win], collate_fn=collator,
                    num_workers=cfg.data.num_workers, pin_memory=acc.device.type == "cuda",
                    persistent_workers=False,
                    # Its own generator: creating an iterator must not draw from the global RNG,
                    # or a resumed run's dropout masks would differ from an uninterrupted run's.
                    generator=torch.Generator().manual_seed(t.seed + epoch),
                )
                it = iter(loader)
                for win in windows:
                    t0 = time.perf_counter()
                    micro = [next(it) for _ in win]
                    loss, tokens, new_bad, new_cut, gnorm, lr = self._step(model, optimizer, scheduler, micro,
                                                                           trainable, maybe_unused)
                    step += 1
                    tokens_done += tokens
                    dt = time.perf_counter() - t0
                    for b in new_bad:
                        if b["index"] in bad:
                            continue  # met before (an earlier epoch, or the check before the first step)
                        bad[b["index"]] = b
                        if main:
                            _say(progress, f"skipped bad record {b['id']!r}: {b['reason']}")
                    for c in new_cut:
                        if c["index"] in cut:
                            continue  # seen in an earlier epoch
                        cut[c["index"]] = c
                        if main and len(cut) <= SHOWN_CUTS:
                            more = " (any further: cut_records.jsonl)" if len(cut) == SHOWN_CUTS else ""
                            _say(progress, f"record {c['id']!r} is {c['tokens']} token(s) longer than "
                                           f"data.max_length {max_length}: its end is cut off and not trained{more}")
                    if loss is not None:
                        first_loss = loss if first_loss is None else first_loss
                        last_loss = loss
                    rec = {"step": step, "epoch": round(epoch + (w0 + 1) / steps_per_epoch, 4), "loss": loss,
                           "lr": lr, "grad_norm": gnorm, "tokens": tokens, "tokens_per_s": tokens / dt if dt else None,
                           "bad_records": len(bad), "time": round(time.perf_counter() - start_time, 3)}
                    if main and (step % t.log_every == 0 or step == total):
                        metrics.log(rec)
                        if t.report_to:
                            acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
                    if main and self.on_step is not None:
                        self.on_step({**rec, "total_steps": total})
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                             tok_s=f"{tokens_done / (time.perf_counter() - start_time):.0f}",
                                             refresh=False)
                    if len(bad) > bad_limit:
                        raise TooManyBadRecords(list(bad.values()), bad_limit, n)
                    w0 += 1
                    if t.save_every and (step % t.save_every == 0 or step == total):
                        last_saved = self._save_checkpoint(step, raw, optimizer, scheduler, list(bad.values()),
                                                           list(cut.values()), plan_info, epoch, w0)
                    if step >= total:
                        break
        finally:
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close()
            if main and bad:
                write_jsonl(self.out / BAD_RECORDS_FILE, list(bad.values()))
            if main and cut:
                write_jsonl(self.out / CUT_RECORDS_FILE, list(cut.values()))
                log.warning("%d record(s) longer than data.max_length %d were cut to it (their ends not trained): "
                            "%s", len(cut), max_length, self.out / CUT_RECORDS_FILE)
        elapsed = time.perf_counter() - start_time

        acc.wait_for_everyone()
        model_dir = self.out / "model"
        projector_path = None
        if self.sharded:
            # Gather the full weights (ZeRO-3 / FSDP hold shards) into a CPU copy to save.
            full = acc.get_state_dict(model)
            if main:
                with _whole_models(acc):
                    raw = _cpu_copy(raw, full)
        if restore_attn is not None:
            # saved models load with the standard one
            unwrap_peft(raw.language_model).set_attn_implementation(restore_attn)
        if main:
            raw.eval()
            if lora_base is not None:
                from .lora import save_adapter_run

                save_adapter_run(raw, tok, model_dir, lora_base, {p: getattr(t, p) for p in MODULES})
            else:
                save_model(raw, tok, model_dir)
            if t.save_projector and t.projector == "full":
                projector_path = save_projector(raw, self.out / PROJECTOR_FILE)
        acc.wait_for_everyone()
        if t.report_to:
            acc.end_training()

        result = TrainResult(
            output_dir=self.out, model_dir=model_dir, final_loss=last_loss,
            first_loss=first_loss if first_loss is not None else float("nan"), steps=step,
            metrics_path=self.out / METRICS_FILE, projector_path=projector_path, checkpoint=last_saved,
            resumed_from=resumed_from, bad_records=list(bad.values()), cut_records=list(cut.values()),
            elapsed_s=elapsed, tokens_per_s=tokens_done / elapsed if elapsed > 0 else 0.0, main_process=main,
        )
        if main:
            records = read_metrics(result.metrics_path)
            if first_loss is None:
                # Resumed at its last step: nothing trained now, the losses are those the run logged.
                losses = [r["loss"] for r in records if r.get("loss") is not None]
                if losses:
                    result.first_loss, result.final_loss = losses[0], losses[-1]
            result.loss_curve = plot_loss(records, self.out / CURVE_FILE, title=f"{self.out.name}: training loss")
            result.summary_path = self._summary(result, raw, n, plan)
        return result

    # -- one optimizer step ------------------------------------------------------
    def _step(self, model, optimizer, scheduler, micro: list[dict], trainable, maybe_unused):
        acc = self.acc
        world = acc.num_processes
        dev = acc.device
        local = torch.tensor(
            [sum(supervised_tokens(b) for b in micro), sum(b.get("num_tokens", 0) for b in micro),
             sum(len(b["bad"]) for b in micro), sum(len(b["cut"]) for b in micro)],
            dtype=torch.float64, device=dev)
        glob = acc.reduce(local, "sum") if world > 1 else local
        n_sup, n_tok, n_bad, n_cut = (int(x) for x in glob.tolist())
        new_bad = [b for batch in micro for b in batch["bad"]]
        new_cut = [c for batch in micro for c in batch["cut"]]
        if world > 1 and (n_bad or n_cut):
            from accelerate.utils import gather_object

            new_bad = gather_object(new_bad) if n_bad else new_bad
            new_cut = gather_object(new_cut) if n_cut else new_cut
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or world == 1 or deepspeed else acc.no_sync(model)
            if deepspeed:
                # DeepSpeed steps at accumulation boundaries that accelerate marks; the
                # window may be shorter than grad_accum at the end of an epoch.
                acc.gradient_state._set_sync_gradients(last)
            with sync:
                has_data = batch["num_samples"] > 0 and n_sup > 0
                if has_data:
                    out = model(**model_inputs(batch, dev))
                    # Sum of token losses / tokens of the global batch; DDP averages over
                    # processes, hence x world.
                    loss = out.loss * (out.num_supervised * world / n_sup)
                    loss_sum += out.loss.detach().double() * out.num_supervised
                elif world > 1:
                    loss = sum(p.sum() for p in trainable) * 0.0  # keep every process in the all-reduce
                else:
                    continue
                if world > 1 and maybe_unused:
                    # Text-only batches do not touch the tower / projector; DDP needs
                    # every trainable parameter in the graph.
                    loss = loss + sum(p.sum() for p in maybe_unused) * 0.0
                acc.backward(loss)
        gnorm = None
        if deepspeed:
            acc.gradient_state._set_sync_gradients(True)
            g = acc.deepspeed_engine_wrapped.get_global_grad_norm()  # DeepSpeed clipped inside its step
            gnorm = float(g) if g is not None else None
        elif n_sup > 0 and self.cfg.train.max_grad_norm:
            gnorm = float(acc.clip_grad_norm_(trainable, self.cfg.train.max_grad_norm))
        # The rate this step applies (the first group's), read before the scheduler moves on to the next
        # step's: with warmup, step 1 applies 0 and the last cosine step a small rate, not 0.
        lr = scheduler.get_last_lr()[0]
        optimizer.step()  # a step of only bad records has no gradients: the optimizer leaves the weights alone
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            loss_sum = acc.reduce(loss_sum, "sum")
        loss = float(loss_sum) / n_sup if n_sup else None
        return loss, n_tok, new_bad, new_cut, gnorm, lr

    # -- saving / resuming ---------------------------------------------------------
    def _save_checkpoint(self, step, raw, optimizer, scheduler, bad, cut, plan_info, epoch, window) -> Path:
        acc = self.acc
        from accelerate.utils import gather_object

        rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]
        path = ckpt.checkpoint_dir(self.out, step)
        state = {"step": step, "epoch": epoch, "window": window, "bad_records": bad, "cut_records": cut,
                 "plan": plan_info, "settings": run_settings(self.cfg),
                 "vistune_version": __version__, "processes": acc.num_processes, "sharded": self.sharded}
        if self.sharded:
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
                ckpt.write_loop_state(tmp, scheduler_state=scheduler.state_dict(), rng_states=rngs, state=state)
                replace_directory(tmp, path)
        elif acc.is_main_process:
            ckpt.save_checkpoint(path, trainable=trainable_state_dict(raw), optimizer_state=optimizer.state_dict(),
                                 scheduler_state=scheduler.state_dict(), rng_states=rngs, state=state)
        if acc.is_main_process:
            ckpt.prune(self.out, self.cfg.train.keep_last)
        acc.wait_for_everyone()
        return path

    def _restore(self, path: Path, raw, optimizer, scheduler, plan_info: dict) -> tuple[int, dict, dict]:
        state = ckpt.read_state(path)
        diffs = {k: (state["plan"].get(k), v) for k, v in plan_info.items() if state["plan"].get(k) != v}
        if diffs:
            shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diffs.items())
            raise ConfigError(f"cannot resume from {path}: the data plan changed ({shown}); "
                              "use the original settings or a new output_dir")
        if state.get("sharded", False) != self.sharded:
            raise ConfigError(f"cannot resume from {path}: it was written "
                              f"{'with' if state.get('sharded') else 'without'} DeepSpeed/FSDP sharding")
        if self.sharded:
            self.acc.load_state(str(path / "engine"))
        else:
            ckpt.load_trainable(raw, path)
            optimizer.load_state_dict(ckpt.load_optimizer_state(path))
        scheduler.load_state_dict(ckpt.load_scheduler_state(path))
        rngs = ckpt.load_rng_states(path)
        rank = self.acc.process_index
        ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        if self.acc.is_main_process:
            log.info("resumed from %s (step %d)", path, state["step"])
        cut = {c["index"]: c for c in state.get("cut_records", [])}
        bad = {b.get("index", b["id"]): b for b in state.get("bad_records", [])}
        return int(state["step"]), bad, cut

    def _check_records(self, dataset, bad: dict, bad_limit: float, n: int) -> None:
        """Find the records that cannot be read before the first step (parsing is cheap, opening images
        and tokenizing are not), so that a data set over train.max_bad_records stops now, not hours in."""
        found = [b for b in dataset.unreadable_records() if b["index"] not in bad]
        for b in found:
            bad[b["index"]] = b
        if found and self.acc.is_main_process:
            for b in found[:SHOWN_CUTS]:
                log.warning("bad record %r will be skipped: %s", b["id"], b["reason"])
            if len(found) > SHOWN_CUTS:
                log.warning("... and %d more bad record(s) (%s)", len(found) - SHOWN_CUTS, self.out / BAD_RECORDS_FILE)
        if len(bad) > bad_limit:
            if self.acc.is_main_process:
                write_jsonl(self.out / BAD_RECORDS_FILE, list(bad.values()))
            raise TooManyBadRecords(list(bad.values()), bad_limit, n)

    def _lora_base(self, model, tok) -> Path:
        """The frozen base of a LoRA run: model.from, or a copy written once into the run."""
        if self.cfg.model.from_ is not None:
            return Path(self.cfg.model.from_).resolve()
        base = self.out / "base"
        if self.acc.is_main_process and not (base / "config.json").exists():
            save_model(model, tok, base)
        self.acc.wait_for_everyone()
        return base.resolve()

    def _summary(self, r: TrainResult, raw, n: int, plan: BatchPlan) -> Path:
        t = self.cfg.train
        rows = [
            ("output", f"`{r.model_dir}`"),
            ("modules", describe(raw, self.cfg)),
            ("records", str(n)),
            ("steps", f"{r.steps} ({plan.steps_per_epoch} per epoch, global batch {plan.window_size})"),
            ("loss", f"{r.first_loss:.4f} -> {r.final_loss:.4f}"),
            ("learning rate", f"{t.lr:g} ({t.scheduler}, warmup {t.warmup_ratio:g})"),
            ("throughput", f"{r.tokens_per_s:.0f} tokens/s over {r.elapsed_s:.1f} s" if r.tokens_per_s
             else "no step left to train (resumed at its last step)" if r.resumed_from else "no tokens trained"),
            ("processes", str(self.acc.num_processes)),
            ("precision", self.acc.mixed_precision),
            ("bad records skipped", str(len(r.bad_records))),
            ("records cut to data.max_length", f"{len(r.cut_records)}"
             + (f" ({CUT_RECORDS_FILE})" if r.cut_records else "")),
        ]
        if r.resumed_from:
            rows.append(("resumed from", f"`{r.resumed_from}`"))
        return write_summary(self.out / SUMMARY_FILE, rows, r.bad_records, title=f"Training run {self.out.name}")


def _fill_deepspeed_config(acc, t) -> None:
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


@contextlib.contextmanager
def _whole_models(acc):
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


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "mps", "npu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


def _module(model, part: str):
    return {"vision": model.vision, "projector": model.projector, "llm": model.language_model}[part]


def _say(progress, msg: str) -> None:
    if progress is not None:
        progress.write(msg)
    else:
        log.warning(msg)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
