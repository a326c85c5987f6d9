"""The three instruction kinds from any OpenAI-compatible LLM (OpenAI, vLLM, a local server).

One request per (image, kind): the prompt of `prompts.py` with the image's symbolic
context. Requests run concurrently up to a bound; 429s, 5xx and timeouts are retried
here (the client's own retries are off, so every retry is logged and counted) with
exponential backoff and jitter. Each usable completion becomes one LLaVA record and is
appended to the output JSONL at once (flushed per record), so a crash or Ctrl-C loses
only requests in flight; a rerun skips every id already in the file. Completions that
are refused or malformed are logged with the image id and reason and never written.

Records: ``{"id": "{image_id}-{kind}", "image": ann.file, "kind": kind,
"conversations": [...]}``, in the order they finish.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from .annotations import ImageAnnotation
from .instructions import DETAIL_INSTRUCTIONS
from .prompts import CompletionError, build_messages, check_kinds, parse_completion

log = logging.getLogger(__name__)

# Defaults for the cost estimate: gpt-4o-mini list prices in USD per 1M tokens
# (input, output). Pass your model's prices with --price-in / --price-out.
DEFAULT_PRICE_IN = 0.15
DEFAULT_PRICE_OUT = 0.60


class LLMError(RuntimeError):
    """A problem that stops the whole run (bad key, unknown model, output file in use)."""


class RetriesExhausted(Exception):
    """One request kept failing with retryable errors; only its job fails."""


@dataclass
class LLMConfig:
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_attempts: int = 6  # requests per job, first try included
    backoff_base: float = 1.0  # seconds; the n-th retry waits about base * 2**n
    backoff_max: float = 60.0
    timeout: float = 120.0  # seconds per request
    temperature: float | None = None  # None: the server's default
    max_tokens: int | None = None
    price_in: float = DEFAULT_PRICE_IN
    price_out: float = DEFAULT_PRICE_OUT
    seed: int = 0
    # Requests in a row that could not connect before the run stops: a server that is down fails every job,
    # and retrying each of them to max_attempts would take hours to say so.
    max_connection_failures: int = 20


@dataclass
class RunSummary:
    jobs: int = 0  # (image, kind) pairs asked for
    skipped: int = 0  # already in the output
    no_captions: int = 0  # images left out: nothing to describe them with
    written: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)  # rejection/failure reason -> count

    def cost(self, price_in: float, price_out: float) -> float:
        return (self.prompt_tokens * price_in + self.completion_tokens * price_out) / 1e6

    def report(self, price_in: float = DEFAULT_PRICE_IN, price_out: float = DEFAULT_PRICE_OUT) -> str:
        lines = [
            f"{self.written} written, {self.skipped} already done, {self.rejected} rejected, "
            f"{self.failed} failed (of {self.jobs} jobs) in {self.seconds:.1f}s",
            *([f"{self.no_captions} image(s) without captions skipped"] if self.no_captions else []),
            f"{self.requests} requests, {self.retries} retries; tokens: {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion; estimated cost ${self.cost(price_in, price_out):.4f} "
            f"(at ${price_in}/M in, ${price_out}/M out)",
        ]
        for reason, n in self.reasons.most_common(10):
            lines.append(f"  {n} x {reason}")
        if self.rejected or self.failed:
            lines.append("rerun the same command to retry what was rejected or failed")
        return "\n".join(lines)


# --- completions -> records -------------------------------------------------------------

def job_id(ann: ImageAnnotation, kind: str) -> str:
    return f"{ann.id}-{kind}"


def job_rng(seed: int, ann: ImageAnnotation, kind: str) -> random.Random:
    # Per job, not per run: a record's phrasing and placeholder side do not depend on
    # which requests finished first or on what an earlier, interrupted run did.
    return random.Random(f"{seed}/{ann.id}/{kind}")


def request_seed(seed: int, where: str) -> int:
    """The sampling seed sent with a job's requests (OpenAI's ``seed``): per job, as ``job_rng``, so
    a server that honours it answers a rerun the same whatever order the jobs ran in."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{where}".encode()).digest()[:4], "big") >> 1


def to_record(ann: ImageAnnotation, kind: str, pairs: Sequence[tuple[str | None, str]], rng: random.Random) -> dict:
    """(question, answer) pairs -> a LLaVA record; `<image>` goes into the first human turn,
    before or after the text at random (as LLaVA's data has it)."""
    conv = []
    for i, (q, a) in enumerate(pairs):
        if q is None:
            q = rng.choice(DETAIL_INSTRUCTIONS)
        if i == 0:
            q = f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": a})
    return {"id": job_id(ann, kind), "image": ann.file, "kind": kind, "conversations": conv}


def completion_record(ann: ImageAnnotation, kind: str, response, seed: int) -> dict:
    """A chat-completion response -> record, or CompletionError with the reason."""
    if not getattr(response, "choices", None):
        raise CompletionError("response has no choices")
    choice = response.choices[0]
    message = choice.message
    refusal = getattr(message, "refusal", None)
    if refusal:
        raise CompletionError(f"refusal: {str(refusal)[:80]}")
    if choice.finish_reason == "content_filter":
        raise CompletionError("refusal: stopped by the content filter")
    if choice.finish_reason == "length":
        raise CompletionError("truncated (finish_reason=length); raise --max-tokens")
    pairs = parse_completion(kind, message.content, ann)
    return to_record(ann, kind, pairs, job_rng(seed, ann, kind))


# --- the output file --------------------------------------------------------------------

class OutputLog:
    """Append-only JSONL output that knows which ids it holds.

    Opening it drops a torn last line (a write cut off by a kill) so the record is made
    again, and takes an exclusive lock so two runs never append to one file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.dropped_tail = False
        self._f = open(self.path, "a+b")
        try:
            self._lock()
            self._scan()
        except BaseException:
            self._f.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the rest still holds
            return
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LLMError(f"{self.path} is being written by another process") from None

    def _scan(self) -> None:
        self._f.seek(0)
        data = self._f.read()
        end = len(data)
        if data and not data.endswith(b"\n"):
            end = data.rfind(b"\n") + 1
            self._f.truncate(end)
            self.dropped_tail = True
            log.warning("%s: dropped a partial last line (an interrupted write); it will be made again", self.path)
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rid = json.loads(line)["id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LLMError(f"{self.path}:{n}: not a record (JSON object with 'id'); fix or move the file") from None
            self.done.add(str(rid))
        self._f.seek(0, os.SEEK_END)

    def append(self, record: dict) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        self.done.add(record["id"])

    def close(self) -> None:
        self._f.close()


# --- requests with retries --------------------------------------------------------------

def retry_reason(exc: BaseException) -> str | None:
    """Why `exc` is worth retrying, or None if it is not."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return CONNECTION_ERROR
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
        return "broken JSON in a 200 response"  # a proxy or server that cut its reply: as flaky as a 5xx
    if isinstance(exc, openai.APIStatusError):
        s = exc.status_code
        if s == 429:
            return "429 rate limited"
        if s >= 500 or s in (408, 409):
            return f"{s} server error"
    return None


CONNECTION_ERROR = "connection error"


def is_fatal(exc: BaseException) -> bool:
    """Errors that every other request would hit too: stop the run instead of failing each job."""
    import openai

    return isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError))


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random, retry_after: float | None = None) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random, so
    clients that failed together do not come back together; a server's Retry-After is a floor."""
    step = min(cap, base * 2 ** retry)
    delay = step / 2 + rng.uniform(0, step / 2)
    if retry_after is not None:
        delay = max(delay, min(cap, retry_after))
    return delay


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        if "retry-after" in headers:
            return float(headers["retry-after"])
    except ValueError:  # an HTTP date: ignore it, backoff still applies
        return None
    return None


def api_key(cfg: LLMConfig) -> str:
    """The key from the environment variable `cfg.api_key_env`; a custom --base-url may do without."""
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if cfg.base_url is None:
        raise LLMError(f"no API key: set the environment variable {cfg.api_key_env} (or choose it with --api-key-env)")
    return "none"  # local servers (vLLM, llama.cpp) usually accept any key


def make_client(cfg: LLMConfig):
    """AsyncOpenAI with its own retries off: we retry, visibly and countably."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key=api_key(cfg), base_url=cfg.base_url, max_retries=0, timeout=cfg.timeout)


class Runner:
    def __init__(self, client, cfg: LLMConfig, out: OutputLog, summary: RunSummary,
                 sleep: Callable[[float], Awaitable[None]]):
        self.client, self.cfg, self.out, self.summary, self.sleep = client, cfg, out, summary, sleep
        self.jitter = random.Random(cfg.seed)
        self.unreachable = 0  # requests in a row that could not connect

    async def request(self, messages: list[dict], where: str):
        cfg = self.cfg
        kwargs: dict = {"model": cfg.model, "messages": messages, "seed": request_seed(cfg.seed, where)}
        if cfg.temperature is not None:
            kwargs["temperature"] = cfg.temperature
        if cfg.max_tokens is not None:
            kwargs["max_tokens"] = cfg.max_tokens
        for attempt in range(cfg.max_attempts):
            self.summary.requests += 1
            try:
                response = await self.client.chat.completions.create(**kwargs)
                self.unreachable = 0
                return response
            except Exception as exc:  # noqa: BLE001 - sorted into retry / fatal / give up below
                if is_fatal(exc):
                    raise LLMError(f"{where}: {type(exc).__name__}: {exc} (check --model, --base-url and the API key)") from exc
                reason = retry_reason(exc)
                self.unreachable = self.unreachable + 1 if reason == CONNECTION_ERROR else 0
                if self.unreachable >= cfg.max_connection_failures:
                    raise LLMError(f"cannot reach {cfg.base_url or 'the OpenAI API'}: {self.unreachable} requests in "
                                   f"a row failed to connect ({exc}); is the server up? Rerun to continue") from exc
                if reason is None:
                    raise
                if attempt + 1 == cfg.max_attempts:
                    raise RetriesExhausted(f"{reason} ({cfg.max_attempts} attempts)") from exc
                delay = backoff_delay(attempt, cfg.backoff_base, cfg.backoff_max, self.jitter, _retry_after(exc))
                self.summary.retries += 1
                log.info("%s: %s, retry %d/%d in %.2fs", where, reason, attempt + 1, cfg.max_attempts - 1, delay)
                await self.sleep(delay)
        raise AssertionError("unreachable")

    async def job(self, ann: ImageAnnotation, kind: str) -> None:
        where = f"image {ann.id} {kind}"
        s = self.summary
        try:
            response = await self.request(build_messages(kind, ann), where)
        except LLMError:
            raise
        except RetriesExhausted as e:
            s.failed += 1
            s.reasons[f"failed: {e}"] += 1
            log.warning("%s: failed: %s", where, e)
            return
        except Exception as e:  # noqa: BLE001 - e.g. a 400 for this one request: skip it, keep going
            s.failed += 1
            s.reasons[f"failed: {type(e).__name__}"] += 1
            log.warning("%s: failed: %s: %s", where, type(e).__name__, e)
            return
        usage = getattr(response, "usage", None)
        if usage is not None:
            s.prompt_tokens += usage.prompt_tokens or 0
            s.completion_tokens += usage.completion_tokens or 0
        try:
            record = completion_record(ann, kind, response, self.cfg.seed)
        except CompletionError as e:
            s.rejected += 1
            s.reasons[f"rejected: {e.reason.split(':')[0]}"] += 1
            log.warning("%s: rejected: %s", where, e.reason)
            log.debug("%s: rejected completion: %r", where, getattr(response.choices[0].message, "content", None)
                      if getattr(response, "choices", None) else None)
            return
        self.out.append(record)
        s.written += 1


async def run_bounded(items: list, concurrency: int, handle: Callable[[Any], Awaitable[None]]) -> None:
    """``handle`` every item, at most ``concurrency`` at a time (K workers draining one queue); when one
    fails, the others are cancelled and the error goes on."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await handle(item)

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(items)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _run(jobs: list[tuple[ImageAnnotation, str]], cfg: LLMConfig, out: OutputLog,
               summary: RunSummary, progress: bool, sleep) -> None:
    from tqdm.auto import tqdm

    # The client lives inside this event loop: its connection pool belongs to it.
    async with make_client(cfg) as client:
        with tqdm(total=len(jobs), desc="instruct", unit="req", disable=not progress) as bar:
            runner = Runner(client, cfg, out, summary, sleep)

            async def one(job: tuple[ImageAnnotation, str]) -> None:
                await runner.job(*job)
                bar.set_postfix(ok=summary.written, rej=summary.rejected, fail=summary.failed, refresh=False)
                bar.update(1)

            # K workers with one request each in flight: the concurrency bound.
            await run_bounded(jobs, cfg.concurrency, one)


def plan_jobs(annotations: Sequence[ImageAnnotation], kinds: Sequence[str], limit: int | None = None
              ) -> list[tuple[ImageAnnotation, str]]:
    """(image, kind) pairs in file order; `limit` counts images, so a rerun with the same
    limit asks for the same set."""
    anns = list(annotations)[:limit] if limit is not None else list(annotations)
    return [(a, k) for a in anns if has_captions(a) for k in kinds]


def has_captions(ann: ImageAnnotation) -> bool:
    """Every kind's prompt builds on the captions: without one, an LLM would invent the image."""
    return any(c.strip() for c in ann.captions)


def generate_with_llm(
    annotations: Sequence[ImageAnnotation],
    kinds: Sequence[str],
    out_path: str | os.PathLike,
    cfg: LLMConfig,
    *,
    limit: int | None = None,
    progress: bool = True,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> RunSummary:
    """Generate records for every (image, kind) not yet in `out_path`; returns the summary.
    Raises `LLMError` when the whole run cannot go on (bad key, unknown model)."""
    kinds = check_kinds(list(kinds))
    if Path(out_path).suffix == ".json":
        raise ValueError(f"{out_path}: the output is appended one record per line: name it .jsonl")
    if cfg.concurrency < 1 or cfg.max_attempts < 1 or cfg.max_connection_failures < 1:
        raise ValueError("concurrency, max_attempts and max_connection_failures must be at least 1")
    api_key(cfg)  # fail before touching the output
    summary = RunSummary()
    start = time.perf_counter()
    out = OutputLog(out_path)
    try:
        all_jobs = plan_jobs(annotations, kinds, limit)
        asked = list(annotations)[:limit] if limit is not None else list(annotations)
        missing = [a.id for a in asked if not has_captions(a)]
        summary.no_captions = len(missing)
        if missing:
            log.warning("%d image(s) have no caption and were skipped (first: %s)", len(missing),
                        ", ".join(missing[:5]))
        summary.jobs = len(all_jobs)
        jobs = [(a, k) for a, k in all_jobs if job_id(a, k) not in out.done]
        summary.skipped = summary.jobs - len(jobs)
        if summary.skipped:
            log.info("%s: %d of %d records already there, skipping them", out.path, summary.skipped, summary.jobs)
        if jobs:
            asyncio.run(_run(jobs, cfg, out, summary, progress, sleep))
    except KeyboardInterrupt:
        summary.seconds = time.perf_counter() - start
        log.warning("interrupted; records so far are saved, rerun to continue\n%s",
                    summary.report(cfg.price_in, cfg.price_out))
        raise
    finally:
        out.close()
    summary.seconds = time.perf_counter() - start
    return summary
