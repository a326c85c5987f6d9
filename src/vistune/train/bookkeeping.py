"""What a run keeps account of as it goes: bad and cut records, losses, tokens and time, and
where each step's record goes (metrics.jsonl, trackers, the progress bar, ``on_step``)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..files import write_jsonl
from .config import RunConfig
from .metrics import CURVE_FILE, METRICS_FILE, SUMMARY_FILE, MetricsLog, plot_loss, read_metrics, write_summary
from .rundir import BAD_RECORDS_FILE, CUT_RECORDS_FILE
from .stages import describe
from .step import StepResult

log = logging.getLogger("vistune.train")

SHOWN_CUTS = 5  # cuts (and bad records found before the first step) named as they happen; the files list them all


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


class Bookkeeper:
    """A run's running account. Bad and cut records are keyed by their index in the data set, so
    one met again (a later epoch) counts once; a resumed run starts from its checkpoint's."""

    def __init__(self, acc, cfg: RunConfig, out: Path, num_records: int, total_steps: int, max_length: int,
                 on_step: Callable[[dict], None] | None = None):
        self.acc, self.cfg, self.out = acc, cfg, out
        self.main = acc.is_main_process
        self.n, self.total, self.max_length, self.on_step = num_records, total_steps, max_length, on_step
        t = cfg.train
        self.bad_limit = t.max_bad_records if t.max_bad_records >= 1 else t.max_bad_records * num_records
        self.bad: dict = {}
        self.cut: dict = {}
        self.first_loss: float | None = None
        self.last_loss = float("nan")
        self.tokens = 0
        self.metrics: MetricsLog | None = None
        self.progress = None
        self.start_time = time.perf_counter()

    def restore(self, bad: list[dict], cut: list[dict]) -> None:
        """The bad and cut records of the run a checkpoint continues."""
        self.cut = {c["index"]: c for c in cut}
        self.bad = {b.get("index", b["id"]): b for b in bad}

    def check_records(self, dataset) -> None:
        """Find the records that cannot be read before the first step (parsing is cheap, opening images
        and tokenizing are not), so that a data set over train.max_bad_records stops now, not hours in."""
        found = [b for b in dataset.unreadable_records() if b["index"] not in self.bad]
        for b in found:
            self.bad[b["index"]] = b
        if found and self.main:
            for b in found[:SHOWN_CUTS]:
                log.warning("bad record %r will be skipped: %s", b["id"], b["reason"])
            if len(found) > SHOWN_CUTS:
                log.warning("... and %d more bad record(s) (%s)", len(found) - SHOWN_CUTS, self.out / BAD_RECORDS_FILE)
        if len(self.bad) > self.bad_limit:
            if self.main:
                write_jsonl(self.out / BAD_RECORDS_FILE, list(self.bad.values()))
            raise TooManyBadRecords(list(self.bad.values()), self.bad_limit, self.n)

    def start(self, step: int, resumed: bool) -> None:
        """Trackers, metrics.jsonl (cut back to ``step`` when ``resumed``) and the progress bar; the clock."""
        t = self.cfg.train
        if t.report_to:
            self.acc.init_trackers("vistune", config=_flat(self.cfg.to_dict()))
        if self.main:
            self.metrics = MetricsLog(self.out / METRICS_FILE, resume_step=step if resumed else None)
        if self.main and t.progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=self.total, initial=step, desc="train", unit="step", dynamic_ncols=True)
        self.start_time = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def after_step(self, step: int, epoch: float, r: StepResult, dt: float) -> None:
        """Count step ``step`` (``epoch``: how far into the epochs it ends), log it where the run logs,
        and stop the run once bad records pass train.max_bad_records."""
        t = self.cfg.train
        self.tokens += r.tokens
        for b in r.bad:
            if b["index"] in self.bad:
                continue  # met before (an earlier epoch, or the check before the first step)
            self.bad[b["index"]] = b
            if self.main:
                self._say(f"skipped bad record {b['id']!r}: {b['reason']}")
        for c in r.cut:
            if c["index"] in self.cut:
                continue  # seen in an earlier epoch
            self.cut[c["index"]] = c
            if self.main and len(self.cut) <= SHOWN_CUTS:
                more = " (any further: cut_records.jsonl)" if len(self.cut) == SHOWN_CUTS else ""
                self._say(f"record {c['id']!r} is {c['tokens']} token(s) longer than "
                          f"data.max_length {self.max_length}: its end is cut off and not trained{more}")
        if r.loss is not None:
            self.first_loss = r.loss if self.first_loss is None else self.first_loss
            self.last_loss = r.loss
        rec = {"step": step, "epoch": epoch, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
               "tokens": r.tokens, "tokens_per_s": r.tokens / dt if dt else None, "bad_records": len(self.bad),
               "time": round(time.perf_counter() - self.start_time, 3)}
        if self.main and (step % t.log_every == 0 or step == self.total):
            self.metrics.log(rec)
            if t.report_to:
                self.acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
        if self.main and self.on_step is not None:
            self.on_step({**rec, "total_steps": self.total})
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{r.lr:.2e}",
                                      tok_s=f"{self.tokens / (time.perf_counter() - self.start_time):.0f}",
                                      refresh=False)
        if len(self.bad) > self.bad_limit:
            raise TooManyBadRecords(list(self.bad.values()), self.bad_limit, self.n)

    def close(self) -> None:
        """Close the bar and metrics.jsonl; write the bad and cut records files (also when the run failed)."""
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.main and self.bad:
            write_jsonl(self.out / BAD_RECORDS_FILE, list(self.bad.values()))
        if self.main and self.cut:
            write_jsonl(self.out / CUT_RECORDS_FILE, list(self.cut.values()))
            log.warning("%d record(s) longer than data.max_length %d were cut to it (their ends not trained): "
                        "%s", len(self.cut), self.max_length, self.out / CUT_RECORDS_FILE)

    def finish(self, result, raw, plan) -> None:
        """The losses a run resumed at its last step logged before, the loss curve and the summary
        (main process), into ``result`` (a TrainResult)."""
        records = read_metrics(result.metrics_path)
        if self.first_loss is None:
            # Resumed at its last step: nothing trained now, the losses are those the run logged.
            losses = [r["loss"] for r in records if r.get("loss") is not None]
            if losses:
                result.first_loss, result.final_loss = losses[0], losses[-1]
        result.loss_curve = plot_loss(records, self.out / CURVE_FILE, title=f"{self.out.name}: training loss")
        result.summary_path = self._summary(result, raw, plan)

    def _summary(self, r, raw, plan) -> Path:
        t = self.cfg.train
        rows = [
            ("output", f"`{r.model_dir}`"),
            ("modules", describe(raw, self.cfg)),
            ("records", str(self.n)),
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

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.write(msg)
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
