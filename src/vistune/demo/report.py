"""The demo's outputs: report.md, report.json, loss.png, accuracy.png.

The plots are train's and eval's (`plot_losses`, `comparison_chart`); what is the demo's own
is its targets and the account of what it chose from the machine.
"""
from __future__ import annotations

from pathlib import Path

from ..eval.report import comparison_chart, markdown_table
from ..files import atomic_write_text, write_json
from ..train.metrics import plot_losses, read_metrics

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


def plot_accuracy(report: dict, path: Path) -> Path:
    """Held-out accuracy per kind of question: each variant beside the majority answer."""
    series = {LABELS.get(v, v): by for v, by in report["accuracy_by_kind"].items()}
    series["majority answer"] = {k: v for k, v in report["majority_baseline"].items() if k != "overall"}
    return comparison_chart(path, series, ylabel="held-out accuracy", colors={"majority answer": "#bbbbbb"})


def markdown(report: dict, samples: dict, recall_samples: list) -> str:
    acc, by_kind, maj = report["accuracy"], report["accuracy_by_kind"], report["majority_baseline"]
    kinds = sorted({k for v in by_kind.values() for k in v})
    lines = ["# vistune demo", "",
             f"Seed {report['seed']}; {report['questions']} short-answer questions on held-out scenes; "
             f"total time {report['timings']['total_s']:.0f} s"
             + (" (a resumed run: the timings are those of its resumed part)." if report.get("resumed") else "."), "",
             "## Ablations (held-out exact-match accuracy)", ""]
    first = report["accuracy_first_word"]
    rows = [[LABELS.get(v, v), f"{a:.1%}", f"{first[v]:.1%}", *(f"{by_kind[v].get(k, 0):.0%}" for k in kinds)]
            for v, a in acc.items()]
    rows.append(["majority answer per kind", f"{maj['overall']:.1%}", f"{maj['overall']:.1%}",
                 *(f"{maj.get(k, 0):.0%}" for k in kinds)])
    lines.append(markdown_table(["variant", "overall", "first word", *kinds], rows))
    lines += ["", "*First word*: the answer's first word is the expected one, whether or not the model "
              "stopped after it (exact match needs both)."]
    lines += ["", "## Targets", ""]
    lines.append(markdown_table(["target", "bar", "measured", "met"], [
        [k.replace("_", " "), t["target"], f"{t['value']:g}", "n/a" if t["met"] is None else "yes" if t["met"] else "**no**"]
        for k, t in report["targets"].items()]))
    lines += ["", f"Object recall of detailed descriptions (full pipeline): {report['object_recall']:.1%}", "",
              "## Training", ""]
    lines.append(markdown_table(["run", "first loss", "final loss", "steps"], [
        [k, f"{r['first']:.3f}", f"{r['final']:.3f}", r["steps"]] for k, r in report["train_losses"].items()]))
    lines += ["", "## Timings", ""]
    lines.append(markdown_table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in report["timings"].items()]))
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
        lines += ["", markdown_table(["run", "first step s (with compile)", "median step s after it"], [
            [k, v["first_step_s"] if v["first_step_s"] is not None else "-", f"{v['median_step_s']:.3f}"]
            for k, v in steps.items()])]
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
    """``runs``: name -> its TrainResult (the loss plot reads each run's metrics.jsonl)."""
    plot_losses({k.replace("_", " "): read_metrics(r.metrics_path) for k, r in runs.items()}, out / "loss.png")
    plot_accuracy(report, out / "accuracy.png")
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report, samples, recall_samples))
    write_json(out / "samples.json", {"answers": samples, "descriptions": recall_samples})
