"""MiniGPT-4's curation of detailed descriptions: rewrite by an LLM, filter by rules, write records.

The descriptions come from a vistune model (`vistune.infer.describe`). Each is sent to any
OpenAI-compatible LLM with MiniGPT-4's rewriting prompt, through the data engine's requests
(`instruct.llm`: concurrency, retries with backoff, resume from the output file). The
rewritten texts then pass rules (length, repetition, refusals, non-English); what passes
becomes a LLaVA record with an instruction of MiniGPT-4's pool, and a Markdown report says
what was dropped and why.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from ..files import atomic_write_text
from ..text.templates import MINIGPT4_INSTRUCTIONS
from .llm import (LLMConfig, LLMError, OutputLog, RetriesExhausted, Runner, RunSummary, api_key, make_client,
                  run_bounded)

# MiniGPT-4's rewriting prompt (arXiv 2304.10592, section 3.2).
REWRITE_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not English "
    "sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. Return directly the "
    "results without explanation. Return directly the input paragraph if it is already correct without explanation."
)


# --- rewriting -------------------------------------------------------------------------------

def rewrite_messages(description: str) -> list[dict]:
    return [{"role": "user", "content": f"{REWRITE_PROMPT}\n\nParagraph: {description}"}]


def rewrite_descriptions(descriptions: Sequence[dict], out_path: str | os.PathLike, cfg: LLMConfig, *,
                         progress: bool = False,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> RunSummary:
    """Rewrite each description (``{"id", "image", "description"}``) not yet in ``out_path``.

    Appends ``{"id", "image", "description", "rewritten"}`` per reply; failures are counted
    and logged, never written, so a rerun asks for them again.
    """
    if cfg.concurrency < 1 or cfg.max_attempts < 1:
        raise ValueError("concurrency and max_attempts must be at least 1")
    api_key(cfg)
    summary = RunSummary(jobs=len(descriptions))
    start = time.perf_counter()
    out = OutputLog(out_path)
    try:
        todo = [d for d in descriptions if str(d["id"]) not in out.done and d["description"].strip()]
        summary.skipped = sum(str(d["id"]) in out.done for d in descriptions)
        if todo:
            asyncio.run(_rewrite_all(todo, cfg, out, summary, progress, sleep))
    finally:
        out.close()
    summary.seconds = time.perf_counter() - start
    return summary


async def _rewrite_all(todo: list[dict], cfg: LLMConfig, out: OutputLog, summary: RunSummary, progress: bool,
                       sleep) -> None:
    from tqdm.auto import tqdm

    async with make_client(cfg) as client:
        runner = Runner(client, cfg, out, summary, sleep)
        with tqdm(total=len(todo), desc="rewrite", unit="req", disable=not progress) as bar:

            async def one(d: dict) -> None:
                await _rewrite_one(runner, d, summary, out)
                bar.update(1)

            await run_bounded(todo, cfg.concurrency, one)


async def _rewrite_one(runner: Runner, d: dict, summary: RunSummary, out: OutputLog) -> None:
    where = f"description {d['id']}"
    try:
        response = await runner.request(rewrite_messages(d["description"]), where)
    except LLMError:
        raise
    except RetriesExhausted as e:
        summary.failed += 1
        summary.reasons[f"failed: {e}"] += 1
        return
    except Exception as e:  # noqa: BLE001 - one bad request (a 400) fails its job only
        summary.failed += 1
        summary.reasons[f"failed: {type(e).__name__}"] += 1
        return
    usage = getattr(response, "usage", None)
    if usage is not None:
        summary.prompt_tokens += usage.prompt_tokens or 0
        summary.completion_tokens += usage.completion_tokens or 0
    choice = response.choices[0] if getattr(response, "choices", None) else None
    text = (choice.message.content or "").strip() if choice is not None else ""
    if choice is None or choice.finish_reason == "length" or not text:
        summary.rejected += 1
        summary.reasons["rejected: empty or cut-off rewrite"] += 1
        return
    out.append({"id": str(d["id"]), "image": d["image"], "description": d["description"], "rewritten": text})
    summary.written += 1


# --- rules -----------------------------------------------------------------------------------

@dataclass
class FilterRules:
    min_words: int = 30
    max_words: int = 400
    max_repeated_sentences: int = 0  # sentences that appear again, verbatim (case and spaces aside)
    max_repeated_trigrams: float = 0.3  # share of word trigrams that are repeats
    min_ascii: float = 0.9  # share of words in ASCII letters
    min_common_english: float = 0.15  # share of words among the commonest English ones (the, of, image...)


_REFUSAL = re.compile(
    r"\b(i'?m sorry|i apologi[sz]e|i cannot|i can'?t|i am unable|i'?m unable|unable to (see|view|describe)|"
    r"as an ai|language model|cannot (see|view) (the )?image|no image (was )?provided)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)
_ENGLISH = frozenset(
    "a an the and or but of in on at to for with from by is are was were be been it its this that these those there "
    "image picture photo shows show shown can see seen has have had as which who while also some many one two three "
    "left right top bottom front back side near next behind above below small large big white black red green blue "
    "yellow brown color colour colored man woman people person room table background foreground".split())


def check_description(text: str, rules: FilterRules = FilterRules()) -> str | None:
    """Why a description is dropped, or None to keep it."""
    words = _WORD.findall(text)
    if _REFUSAL.search(text):
        return "refusal"
    if not words:
        return "too short"
    ascii_share = sum(w.isascii() for w in words) / len(words)
    common_share = sum(w.lower() in _ENGLISH for w in words) / len(words)
    if ascii_share < rules.min_ascii or common_share < rules.min_common_english:
        return "non-English"
    if len(words) < rules.min_words:
        return "too short"
    if len(words) > rules.max_words:
        return "too long"
    sentences = [re.sub(r"\s+", " ", s).strip().lower() for s in _SENTENCE.split(text) if s.strip()]
    if len(sentences) - len(set(sentences)) > rules.max_repeated_sentences:
        return "repetition"
    lower = [w.lower() for w in words]
    trigrams = list(zip(lower, lower[1:], lower[2:]))
    if trigrams and 1 - len(set(trigrams)) / len(trigrams) > rules.max_repeated_trigrams:
        return "repetition"
    return None


# --- records and report ----------------------------------------------------------------------

@dataclass
class CurateResult:
    kept: int
    dropped: Counter
    records_path: Path
    report_path: Path


def curated_record(rewritten: dict, rng: random.Random) -> dict:
    instruction = rng.choice(MINIGPT4_INSTRUCTIONS)
    return {"id": rewritten["id"], "image": rewritten["image"],
            "conversations": [{"from": "human", "value": f"<image>\n{instruction}"},
                              {"from": "gpt", "value": rewritten["rewritten"]}]}


def write_curated(descriptions: Sequence[dict], rewritten: Sequence[dict], records_path: str | os.PathLike,
                  report_path: str | os.PathLike, rules: FilterRules = FilterRules(), seed: int = 0,
                  rewrite_failures: Counter | None = None) -> CurateResult:
    """Filter the rewritten descriptions; write the kept ones as LLaVA JSONL and a report of the rest."""
    by_id = {r["id"]: r for r in rewritten}
    kept, dropped = [], []
    for d in descriptions:
        rid = str(d["id"])
        r = by_id.get(rid)
        if not d["description"].strip():
            dropped.append((rid, "empty description", ""))
        elif r is None:
            dropped.append((rid, "not rewritten (the LLM failed; rerun to retry)", d["description"]))
        else:
            reason = check_description(r["rewritten"], rules)
            if reason is None:
                kept.append(curated_record(r, random.Random(f"{seed}/{rid}")))
            else:
                dropped.append((rid, reason, r["rewritten"]))
    atomic_write_text(records_path, "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
    counts = Counter(reason for _, reason, _ in dropped)
    atomic_write_text(report_path, report_markdown(len(descriptions), len(kept), dropped, rules, rewrite_failures))
    return CurateResult(len(kept), counts, Path(records_path), Path(report_path))


def report_markdown(total: int, kept: int, dropped: list[tuple[str, str, str]], rules: FilterRules,
                    rewrite_failures: Counter | None = None) -> str:
    counts = Counter(reason for _, reason, _ in dropped)
    lines = ["# Curation report", "",
             f"{total} descriptions: {kept} kept, {len(dropped)} dropped.", "",
             f"Rules: {rules.min_words}-{rules.max_words} words, at most {rules.max_repeated_sentences} repeated "
             f"sentences and {rules.max_repeated_trigrams:.0%} repeated word trigrams, no refusals, English.", "",
             "| reason | dropped |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in counts.most_common()]
    if rewrite_failures:
        lines += ["", "LLM requests that failed: " + ", ".join(f"{n} x {r}" for r, n in rewrite_failures.most_common())]
    if dropped:
        lines += ["", "## Dropped", "", "| id | reason | text (start) |", "|---|---|---|"]
        for rid, reason, text in dropped:
            excerpt = re.sub(r"\s+", " ", text)[:80].replace("|", "\\|")
            lines.append(f"| {rid} | {reason} | {excerpt} |")
    return "\n".join(lines) + "\n"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
