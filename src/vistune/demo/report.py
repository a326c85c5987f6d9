"""The demo's outputs: report.md, report.json, loss.png, accuracy.png."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..files import atomic_path, atomic_write_text, write_json
from ..train.metrics import read_metrics

LABELS = {"full": "full pipeline", "no_stage1": "no stage 1", "stage1_only": "stage 1 only",
          "text_only": "text only (blank image)"}


# The demo's targets: it reports its own standing against them.
FULL_ACCURACY_TARGET = 0.90
TEXT_ONLY_MARGIN = 0.05  # text only may beat the majority answer by at most this
IMAGE_GAP_TARGET = 0.20  # full must beat text only by at least this


def check_targets(report: dict, time_budget_s: float, time_applies: bool = True, time_why: str = "") -> dict[str, dict]:
    """Each target with its bar, the measured value and whether it was met (None: not judged).

    The time budget is judged only where it applies (``time_applies``: a CPU with native bf16),
    and never for a resumed run, which timed only its last part."""
    acc = report["accuracy"]
    total = report["timings"]["total_s"]
    skip = "a resumed run" if report.get("resumed") else None if time_applies else time_why or "not this hardware"
    targets = {
        "total_s": {"target": f"<= {time_budget_s:g}" + (f" (not judged: {skip})" if skip else ""),
                    "value": total, "met": None if skip else total <= time_budget_s, "not_judged": skip},
        "full_accuracy": {"target": f">= {FULL_ACCURACY_TARGET:g}", "value": acc["full"],
                          "met": acc["full"] >= FULL_ACCURACY_TARGET},
    }
    if "text_only" in acc:
        bar = report["majority_baseline"]["overall"] + TEXT_ONLY_MARGIN
        targets["text_only_vs_majority"] = {"target": f"<= {bar:.4f} (majority answer + {TEXT_ONLY_MARGIN:g})",
                                            "value": acc["text_only"], "met": acc["text_only"] <= bar}
        gap = round(acc["full"] - acc["text_only"], 4)
        targets["full_over_text_only"] = {"target": f">= {IMAGE_GAP_TARGET:g}", "value": gap,
                                          "met": gap >= IMAGE_GAP_TARGET}
    return targets


def run_losses(metrics_path: Path, steps: int) -> dict:
    """A run's first and final logged loss and its steps."""
    losses = [m["loss"] for m in read_metrics(metrics_path) if m.get("loss") is not None]
    nan = float("nan")
    return {"first": round(losses[0], 4) if losses else nan, "final": round(losses[-1], 4) if losses else nan,
            "steps": steps}


def step_times(metrics_path: Path) -> dict[str, float | None]:
    """A run's first step (with any compile) and its median step after it, in seconds.

    From the elapsed times in metrics.jsonl; where steps were logged every few, a gap is
    shared evenly among its steps.
    """
    recs = [m for m in read_metrics(metrics_path) if m.get("time") is not None and "step" in m]
    if not recs:
        return {"first_step_s": None, "median_step_s": None}
    per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"])
                # A resumed run's clock starts again at its first step: that gap is no step's time.
                for a, b in zip(recs, recs[1:]) if b["step"] > a["step"] and b["time"] >= a["time"]]
    first = recs[0]["time"] if recs[0]["step"] == 1 else None
    return {"first_step_s": None if first is None else round(first, 2),
            "median_step_s": round(statistics.median(per_step), 4) if per_step else None}


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp)


def plot_losses(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), dpi=110, squeeze=False)
    for ax, (name, r) in zip(axes[0], runs.items()):
        recs = [m for m in read_metrics(r.metrics_path) if m.get("loss") is not None]
        if recs:
            ax.plot([m["step"] for m in recs], [m["loss"] for m in recs], color="#08519c", lw=1.2)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def plot_accuracy(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind = report["accuracy_by_kind"]
    variants = list(by_kind)
    kinds = sorted({k for v in by_kind.values() for k in v})
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 3, 3.8), dpi=110)
    w = 0.8 / (len(variants) + 1)
    for i, v in enumerate(variants):
        ax.bar([k + i * w for k in range(len(kinds))], [by_kind[v].get(k, 0) for k in kinds], w, label=LABELS.get(v, v))
    maj = report["majority_baseline"]
    ax.bar([k + len(variants) * w for k in range(len(kinds))], [maj.get(k, 0) for k in kinds], w,
           label="majority answer", color="#bbbbbb")
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(kinds))], kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def markdown(report: dict, samples: dict, recall_samples: list) -> str:
    acc, by_kind, maj = report["accuracy"], report["accuracy_by_kind"], report["majority_baseline"]
    kinds = sorted({k for v in by_kind.values() for k in v})
    lines = ["# vistune demo", "",
             f"Seed {report['seed']}; {report['questions']} short-answer questions on held-out scenes; "
             f"total time {report['timings']['total_s']:.0f} s"
             + (" (a resumed run: the timings are those of its resumed part)." if report.get("resumed") else "."), "",
             "## Ablations (held-out exact-match accuracy)", "",
             "| variant | overall | first word | " + " | ".join(kinds) + " |",
             "|---|---|---|" + "---|" * len(kinds)]
    first = report["accuracy_first_word"]
    for v, a in acc.items():
        lines.append(f"| {LABELS.get(v, v)} | {a:.1%} | {first[v]:.1%} | " +
                     " | ".join(f"{by_kind[v].get(k, 0):.0%}" for k in kinds) + " |")
    lines.append(f"| majority answer per kind | {maj['overall']:.1%} | {maj['overall']:.1%} | " +
                 " | ".join(f"{maj.get(k, 0):.0%}" for k in kinds) + " |")
    lines += ["", "*First word*: the answer's first word is the expected one, whether or not the model "
              "stopped after it (exact match needs both)."]
    lines += ["", "## Targets", "", "| target | bar | measured | met |", "|---|---|---|---|"]
    for k, t in report["targets"].items():
        met = "n/a" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {k.replace('_', ' ')} | {t['target']} | {t['value']:g} | {met} |")
    lines += ["", f"Object recall of detailed descriptions (full pipeline): {report['object_recall']:.1%}", "",
              "## Training", "", "| run | first loss | final loss | steps |", "|---|---|---|---|"]
    for k, r in report["train_losses"].items():
        lines.append(f"| {k} | {r['first']:.3f} | {r['final']:.3f} | {r['steps']} |")
    lines += ["", "## Timings", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    m = report.get("machine")
    if m:
        lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}"
                  f"{', native bf16' if m['native_bf16'] else ''}."]
    p = report.get("machine_plan")
    if p:
        lines += ["", "What the run chose from this machine:", "",
                  f"- precision: {p['precision']} ({p['precision_why']})",
                  f"- compile: {'on' if p['compiled'] else 'off'} ({p['compile_why']})",
                  f"- Muon's orthogonalisation: {p['orthogonalize_dtype']} ({p['orthogonalize_why']})",
                  f"- threads: {p['main_threads']} for the main line"
                  + (f", {p['side_threads']} for the ablation beside it" if p["side_threads"] else ""),
                  f"- time target: {'applies' if p['time_target_applies'] else 'not judged'} ({p['time_target_why']})"]
        if p.get("estimate_s") is not None:
            lines.append(f"- estimated before the run: {p['estimate_s']:.0f} s (a probed stage-2 step: "
                         f"{p['probe_step_s']:.3f} s); took {report['timings']['total_s']:.0f} s")
    steps = {k: v for k, v in report.get("step_times", {}).items() if v.get("median_step_s") is not None}
    if steps:
        lines += ["", "| run | first step s (with compile) | median step s after it |", "|---|---|---|"]
        lines += [f"| {k} | {v['first_step_s'] if v['first_step_s'] is not None else '-'} | {v['median_step_s']:.3f} |"
                  for k, v in steps.items()]
    lines += ["", "## Sample answers (full pipeline)", ""]
    for s in samples.get("full", [])[:12]:
        mark = "ok" if s["correct"] else "WRONG"
        q = s["question"].split("\n")[0]
        lines.append(f"- {q} -> **{s['answer']}** (expected {s['expected']}, {mark})")
    lines += ["", "## Sample descriptions (full pipeline)", ""]
    for s in recall_samples[:4]:
        lines.append(f"- `{s['image']}` ({', '.join(s['objects'])}): {s['description']}")
    lines += ["", "![loss](loss.png)", "", "![accuracy](accuracy.png)", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict, runs: dict, samples: dict, recall_samples: list) -> None:
    plot_losses(runs, out / "loss.png")
    plot_accuracy(report, out / "accuracy.png")
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report, samples, recall_samples))
    write_json(out / "samples.json", {"answers": samples, "descriptions": recall_samples})
