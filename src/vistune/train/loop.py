"""One training loop for both stages, on accelerate (1 CPU process to many GPUs).

The parts, each with one job: `setup` builds what the run trains with, `step` takes one
optimizer step, `bookkeeping` keeps account of records, losses and metrics, `saving`
writes checkpoints and the model. What is left here is the loop itself.

Process-wide settings (threads, the allocator) are the caller's: `vistune train` sets
them with `vistune.runtime.training_process()`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .batches import SkipBad
from .bookkeeping import Bookkeeper, TooManyBadRecords
from .config import RunConfig
from .metrics import METRICS_FILE
from .saving import restore_checkpoint, save_checkpoint, save_trained_model
from .setup import check_sharding, log_model, set_up
from .stages import set_train_mode
from .step import train_step

__all__ = ["TooManyBadRecords", "TrainResult", "Trainer", "check_sharding", "run"]


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


class Trainer:
    def __init__(self, config: RunConfig, resume: str | None = None, overwrite: bool | None = None,
                 on_step: Callable[[dict], None] | None = None):
        self.cfg = config
        self.on_step = on_step
        self.resume = resume if resume is not None else config.train.resume
        self.overwrite = overwrite if overwrite is not None else config.train.overwrite
        self.out = Path(config.output_dir)

    def train(self) -> TrainResult:
        cfg, t, out = self.cfg, self.cfg.train, self.out
        s = set_up(cfg, out, self.resume, self.overwrite)
        plan, total = s.plan, s.total_steps
        books = Bookkeeper(s.acc, cfg, out, len(s.dataset), total, s.text.max_length, self.on_step)
        step = 0
        if s.resumed_from is not None:
            state = restore_checkpoint(s, s.resumed_from)
            step = int(state["step"])
            books.restore(state.get("bad_records", []), state.get("cut_records", []))
        books.check_records(s.dataset)
        log_model(s, cfg)
        books.start(step, resumed=s.resumed_from is not None)
        trainable, maybe_unused = s.trainable(), s.maybe_unused()
        last_saved = None
        try:
            set_train_mode(s.raw, cfg)
            while step < total:
                epoch, w0 = divmod(step, plan.steps_per_epoch)
                windows = plan.rank_windows(epoch, s.acc.process_index)[w0:]
                batches = iter(self._loader(s, windows, epoch))
                for win in windows:
                    t0 = time.perf_counter()
                    r = train_step(s.acc, s.model, s.optimizer, s.scheduler, [next(batches) for _ in win],
                                   trainable, maybe_unused, t.max_grad_norm)
                    step, w0 = step + 1, w0 + 1
                    books.after_step(step, round(epoch + w0 / plan.steps_per_epoch, 4), r, time.perf_counter() - t0)
                    if t.save_every and (step % t.save_every == 0 or step == total):
                        last_saved = save_checkpoint(s, cfg, out, step, epoch, w0, list(books.bad.values()),
                                                     list(books.cut.values()))
                    if step >= total:
                        break
        finally:
            books.close()
        elapsed = books.elapsed

        model_dir, projector_path, raw = save_trained_model(s, cfg, out)
        if t.report_to:
            s.acc.end_training()
        main = s.acc.is_main_process
        result = TrainResult(
            output_dir=out, model_dir=model_dir, final_loss=books.last_loss,
            first_loss=books.first_loss if books.first_loss is not None else float("nan"), steps=step,
            metrics_path=out / METRICS_FILE, projector_path=projector_path, checkpoint=last_saved,
            resumed_from=s.resumed_from, bad_records=list(books.bad.values()), cut_records=list(books.cut.values()),
            elapsed_s=elapsed, tokens_per_s=books.tokens / elapsed if elapsed > 0 else 0.0, main_process=main,
        )
        if main:
            books.finish(result, raw, plan)
        return result

    def _loader(self, s, windows: list, epoch: int) -> DataLoader:
        """This process's micro-batches of ``windows``, in order."""
        return DataLoader(
            SkipBad(s.dataset), batch_sampler=[mb for win in windows for mb in win], collate_fn=s.collator,
            num_workers=self.cfg.data.num_workers, pin_memory=s.acc.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: creating an iterator must not draw from the global RNG,
            # or a resumed run's dropout masks would differ from an uninterrupted run's.
            generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch),
        )
