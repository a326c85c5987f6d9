"""What a run shows: metrics.jsonl, a loss-curve PNG and a Markdown summary."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from ..files import JsonlAppender, atomic_path, atomic_write_text, write_jsonl

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.md"


class MetricsLog:
    """Appends one JSON line per logged step; a resumed run drops lines past its step."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        keep = []
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        write_jsonl(self.path, keep)
        # Flushed per line, not fsynced: a metrics line is cheap to lose, a stall per step is not.
        self._log = JsonlAppender(self.path, sync=False)

    def log(self, record: dict) -> None:
        self._log.append([record])

    def close(self) -> None:
        self._log.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it is good
    return out


def loss_summary(records: list[dict]) -> dict:
    """A run's first and final logged loss (NaN where none was logged)."""
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    nan = float("nan")
    return {"first": round(losses[0], 4) if losses else nan, "final": round(losses[-1], 4) if losses else nan}


def step_times(records: list[dict]) -> dict[str, float | None]:
    """A run's first step (with any compile) and its median step after it, in seconds.

    From the elapsed times of the records; where steps were logged every few, a gap is
    shared evenly among its steps.
    """
    recs = [m for m in records if m.get("time") is not None and "step" in m]
    if not recs:
        return {"first_step_s": None, "median_step_s": None}
    per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"])
                # A resumed run's clock starts again at its first step: that gap is no step's time.
                for a, b in zip(recs, recs[1:]) if b["step"] > a["step"] and b["time"] >= a["time"]]
    first = recs[0]["time"] if recs[0]["step"] == 1 else None
    return {"first_step_s": None if first is None else round(first, 2),
            "median_step_s": round(statistics.median(per_step), 4) if per_step else None}


def _draw_loss(ax, records: list[dict], title: str) -> bool:
    """Loss per step (raw and smoothed) and the learning rate on ``ax``; False if no loss was logged."""
    pts = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if not pts:
        return False
    steps, losses = zip(*pts)
    ax.plot(steps, losses, color="#9ecae1", lw=1, label="loss")
    k = max(1, len(losses) // 25)
    if k > 1:
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="#08519c", lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    lrs = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="#fd8d3c", lw=1, ls="--", label="lr")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(loc="upper right")
    return True


def plot_loss(records: list[dict], path: str | os.PathLike, title: str = "training loss") -> Path | None:
    """Loss per step (raw and smoothed) and the learning rate, as a PNG."""
    if not any(r.get("loss") is not None for r in records):
        return None
    return plot_losses({title: records}, path)


def plot_losses(runs: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """`plot_loss`'s curves for several runs, a panel each (title -> the run's records), in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = len(runs) == 1
    fig, axes = plt.subplots(1, len(runs), figsize=(7, 4) if wide else (4.6 * len(runs), 3.6), dpi=110, squeeze=False)
    for ax, (title, records) in zip(axes[0], runs.items()):
        _draw_loss(ax, records, title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


def write_summary(path: str | os.PathLike, rows: list[tuple[str, str]], bad: list[dict], title: str) -> Path:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if bad:
        lines += ["", f"## Skipped records ({len(bad)})", "", "| id | reason |", "|---|---|"]
        lines += [f"| {b['id']} | {str(b['reason']).replace('|', '/')} |" for b in bad[:200]]
        if len(bad) > 200:
            lines.append(f"| ... | {len(bad) - 200} more in bad_records.jsonl |")
    lines += ["", f"![loss curve]({CURVE_FILE})", ""]
    return atomic_write_text(path, "\n".join(lines))
