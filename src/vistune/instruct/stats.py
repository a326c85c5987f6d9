"""What is in a LLaVA data file: counts by kind, turns per conversation, lengths.

Lengths are those of a record's text (all turns, image placeholders left out: the
image tokens a model adds depend on its vision tower), in tokens of a given tokenizer
or, without one, in whitespace-separated words. Written as a Markdown summary, a JSON
file with every number and a length-histogram PNG.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.records import RecordError, RecordFile, parse_record
from ..files import atomic_path, atomic_write_text, write_json
from ..text.templates import IMAGE_PLACEHOLDER

PERCENTILES = (50, 90, 95, 99)
NO_KIND = "(no kind)"
CLIP_PERCENTILE = 99.5  # the length histogram's range; longer records are counted, not drawn


@dataclass
class DataStats:
    path: str
    unit: str  # "tokens" or "words"
    records: int = 0
    with_image: int = 0
    invalid: int = 0
    problems: list[str] = field(default_factory=list)  # the first few invalid records
    kinds: dict[str, int] = field(default_factory=dict)
    rounds: dict[int, int] = field(default_factory=dict)  # human+assistant exchanges -> records
    lengths: dict[str, list[int]] = field(default_factory=dict)  # kind -> per-record lengths

    def percentiles(self, kind: str | None = None) -> dict[str, float]:
        values = [v for vs in self.lengths.values() for v in vs] if kind is None else self.lengths.get(kind, [])
        if not values:
            return {}
        arr = np.asarray(values)
        out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
        out.update(mean=float(arr.mean()), max=float(arr.max()), min=float(arr.min()))
        return out

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("lengths")
        d["length_percentiles"] = {"all": self.percentiles(), **{k: self.percentiles(k) for k in sorted(self.lengths)}}
        rounds = [r for r, n in self.rounds.items() for _ in range(n)]
        d["mean_rounds"] = float(np.mean(rounds)) if rounds else 0.0
        return d


def _text(conversations: list[dict]) -> str:
    return "\n".join(t["value"].replace(IMAGE_PLACEHOLDER, "").strip() for t in conversations)


def compute_stats(path: str | os.PathLike, tokenizer=None, batch_size: int = 512, progress: bool = True) -> DataStats:
    """Read every record of `path`; invalid ones are counted and named, not fatal."""
    from tqdm.auto import tqdm

    rf = RecordFile(path)
    st = DataStats(str(path), "tokens" if tokenizer is not None else "words")
    kinds: Counter = Counter()
    rounds: Counter = Counter()
    lengths: dict[str, list[int]] = defaultdict(list)
    pending: list[tuple[str, str]] = []  # (kind, text) waiting for the tokenizer

    def flush() -> None:
        if not pending:
            return
        if tokenizer is None:
            counts = [len(text.split()) for _, text in pending]
        else:
            counts = [len(ids) for ids in tokenizer([t for _, t in pending], add_special_tokens=False)["input_ids"]]
        for (kind, _), n in zip(pending, counts):
            lengths[kind].append(n)
        pending.clear()

    for i in tqdm(range(len(rf)), desc="stats", unit="rec", disable=not progress):
        try:
            obj, where = rf.raw(i)
            rec = parse_record(obj, where)
        except RecordError as e:
            st.invalid += 1
            if len(st.problems) < 10:
                st.problems.append(str(e))
            continue
        st.records += 1
        st.with_image += bool(rec.images)
        kind = str(rec.extra.get("kind", NO_KIND))
        kinds[kind] += 1
        rounds[len(rec.conversations) // 2] += 1
        pending.append((kind, _text(rec.conversations)))
        if len(pending) >= batch_size:
            flush()
    flush()
    st.kinds = dict(sorted(kinds.items()))
    st.rounds = dict(sorted(rounds.items()))
    st.lengths = dict(lengths)
    return st


def to_markdown(st: DataStats, plot_name: str | None = None) -> str:
    lines = [f"# Data statistics: `{Path(st.path).name}`", "",
             f"{st.records} records ({st.with_image} with an image), {st.invalid} invalid.", ""]
    lines += ["| kind | records | share |", "|---|---:|---:|"]
    for k, n in st.kinds.items():
        lines.append(f"| {k} | {n} | {n / max(st.records, 1):.1%} |")
    lines += ["", "| rounds per conversation | records |", "|---:|---:|"]
    lines += [f"| {r} | {n} |" for r, n in st.rounds.items()]
    lines += ["", f"Length in {st.unit} (text of all turns, image placeholders left out):", "",
              "| kind | " + " | ".join(f"p{p}" for p in PERCENTILES) + " | mean | max |",
              "|---|" + "---:|" * (len(PERCENTILES) + 2)]
    for k in ["all", *sorted(st.lengths)]:
        pc = st.percentiles(None if k == "all" else k)
        if pc:
            lines.append(f"| {k} | " + " | ".join(f"{pc[f'p{p}']:.0f}" for p in PERCENTILES)
                         + f" | {pc['mean']:.1f} | {pc['max']:.0f} |")
    if st.problems:
        lines += ["", "Invalid records (first ones):", ""] + [f"- {p}" for p in st.problems]
    if plot_name:
        lines += ["", f"![length histogram]({plot_name})"]
        allv = [v for vs in st.lengths.values() for v in vs]
        if allv:
            bins, outliers = length_bins(allv)
            if outliers:
                lines += ["", f"The histogram stops at the {CLIP_PERCENTILE:g}th percentile, {bins[-1]:.0f} {st.unit}: "
                              f"{outliers} longer record(s), up to {max(allv)}, are not shown."]
    return "\n".join(lines) + "\n"


def length_bins(values: list[int], clip: float = CLIP_PERCENTILE) -> tuple[np.ndarray, int]:
    """Histogram bin edges up to the ``clip`` percentile, and how many values lie past them: one
    very long record would otherwise squeeze every other into the first bin."""
    arr = np.asarray(values)
    hi = float(np.percentile(arr, clip))
    shown = arr[arr <= hi]
    bins = np.histogram_bin_edges(shown, bins=min(50, max(5, len(set(shown.tolist())))))
    return bins, int((arr > bins[-1]).sum())


def plot_lengths(st: DataStats, path: str | os.PathLike) -> None:
    """One step histogram per kind on shared bins, up to the 99.5th percentile (the rest counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    allv = [v for vs in st.lengths.values() for v in vs]
    title = Path(st.path).name
    if allv:
        bins, outliers = length_bins(allv)
        for kind in sorted(st.lengths):
            shown = [v for v in st.lengths[kind] if v <= bins[-1]]
            ax.hist(shown, bins=bins, histtype="step", linewidth=1.5, label=f"{kind} ({len(st.lengths[kind])})")
        ax.legend()
        if outliers:
            title += f" ({outliers} longer than {bins[-1]:.0f} not shown, up to {max(allv)})"
    ax.set_xlabel(f"record length ({st.unit})")
    ax.set_ylabel("records")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_report(st: DataStats, out_dir: str | os.PathLike) -> dict[str, Path]:
    """stats.md, stats.json and lengths.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "lengths.png", "md": out / "stats.md", "json": out / "stats.json"}
    plot_lengths(st, paths["png"])
    atomic_write_text(paths["md"], to_markdown(st, paths["png"].name))
    write_json(paths["json"], st.summary(), indent=1)
    return paths
