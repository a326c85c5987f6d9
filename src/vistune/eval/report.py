"""What an evaluation leaves behind for people: metrics.json, report.md and a bar chart.

Every task describes its result the same way: headline metrics (``accuracy`` in [0, 1]
at the top level where the task has one) and ``by``, a breakdown per grouping::

    {"task": "scienceqa", "accuracy": 0.91, "count": 4241, ...,
     "by": {"subject": {"NAT": {"accuracy": 0.90, "count": 2096}, ...}, ...}}

The chart has one panel per grouping, one bar per category.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..files import atomic_path, atomic_write_text, write_json

METRICS = "metrics.json"
# Bumped when a key of metrics.json changes meaning or goes away (docs/eval.md).
METRICS_FORMAT_VERSION = 1
REPORT = "report.md"


def pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(
    path: str | os.PathLike,
    by: dict[str, dict[str, dict]],
    *,
    key: str,
    title: str,
    ylabel: str,
    scale: float = 100.0,
    ymax: float | None = 100.0,
    overall: float | None = None,
) -> Path:
    """One panel per grouping in `by`, a bar per category showing ``entry[key] * scale``;
    `overall` (unscaled) is drawn as a dashed line across every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(g, cats) for g, cats in by.items() if cats]
    if not groups:
        raise ValueError("nothing to chart")
    widths = [max(len(c), 1) for _, c in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 1.1 * sum(widths) + 1.5 * len(groups)), 3.6),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (group, cats) in zip(axes[0], groups):
        names = list(cats)
        values = [(cats[n].get(key) or 0.0) * scale for n in names]
        bars = ax.bar(range(len(names)), values, color="#4C72B0")
        ax.set_xticks(range(len(names)), names, rotation=30 if max((len(n) for n in names), default=0) > 6 else 0)
        for b, v, n in zip(bars, values, names):
            count = cats[n].get("count")
            label = f"{v:.1f}" + (f"\nn={count}" if count is not None else "")
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        if overall is not None:
            ax.axhline(overall * scale, color="#C44E52", linestyle="--", linewidth=1, label=f"all {overall * scale:.1f}")
            ax.legend(loc="upper right", fontsize=7, frameon=False)
        ax.set_title(group, fontsize=9)
        if ymax is not None:
            ax.set_ylim(0, max([ymax] + [v * 1.15 for v in values]))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


def comparison_chart(
    path: str | os.PathLike,
    series: dict[str, dict[str, float]],
    *,
    ylabel: str,
    title: str = "",
    scale: float = 1.0,
    ymax: float | None = 1.0,
    colors: dict[str, str] | None = None,
) -> Path:
    """Several models (or baselines) side by side: one group of bars per category, one bar per
    entry of `series` (label -> category -> value, drawn as ``value * scale``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted({c for values in series.values() for c in values})
    if not cats:
        raise ValueError("nothing to chart")
    fig, ax = plt.subplots(figsize=(1.3 * len(cats) + 3, 3.8), dpi=110)
    w = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([k + i * w for k in range(len(cats))], [values.get(c, 0) * scale for c in cats], w, label=label,
               color=(colors or {}).get(label))
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(cats))], cats)
    if ymax is not None:
        ax.set_ylim(0, ymax)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


def write_report(
    out_dir: str | os.PathLike,
    metrics: dict,
    *,
    title: str,
    summary: Sequence[tuple[str, str]],
    chart_key: str = "accuracy",
    chart_label: str = "accuracy (%)",
    chart_scale: float = 100.0,
    chart_ymax: float | None = 100.0,
    sections: Sequence[str] = (),
) -> dict[str, Path]:
    """Write metrics.json, report.md and ``<task>.png`` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by = {g: c for g, c in metrics.get("by", {}).items() if c}
    if not by and chart_key in metrics:
        by_chart = {"overall": {"all": {chart_key: metrics[chart_key], "count": metrics.get("count")}}}
    else:
        by_chart = by
    chart = bar_chart(out / f"{metrics['task']}.png", by_chart, key=chart_key, title=title, ylabel=chart_label,
                      scale=chart_scale, ymax=chart_ymax, overall=metrics.get(chart_key) if by else None)
    parts = [f"# {title}", ""]
    if metrics.get("model"):
        parts += [f"Model: `{metrics['model']}`", ""]
    parts += [markdown_table(["metric", "value"], summary), ""]
    for group, cats in by.items():
        if not cats:
            continue
        keys = [k for k in next(iter(cats.values())) if k != "count"]
        rows = [[name, *(_fmt(entry.get(k), k) for k in keys), entry.get("count", "")] for name, entry in cats.items()]
        parts += [f"## By {group}", "", markdown_table([group, *keys, "count"], rows), ""]
    parts += [s.rstrip() + "\n" for s in sections]
    parts += [f"![{metrics['task']}]({chart.name})", ""]
    md = atomic_write_text(out / REPORT, "\n".join(parts))
    write_json(out / METRICS, {"format_version": METRICS_FORMAT_VERSION, **metrics})
    return {"metrics": out / METRICS, "report": md, "chart": chart}


def _fmt(v: object, key: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        # Fractions print as percentages; scores (e.g. judge scores 1-10) as they are.
        return f"{100 * v:.2f}%" if key in FRACTION_KEYS else f"{v:.2f}"
    return str(v)


FRACTION_KEYS = {"accuracy", "precision", "recall", "f1", "yes_ratio", "exact_match", "prefix_match"}
