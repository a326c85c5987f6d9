"""Requests that arrive together are generated together.

One worker thread owns the engine. It takes the first waiting job, waits a few
milliseconds for more, and starts them as one batch. Between decoding steps, jobs
that arrived meanwhile join the running batch (up to ``max_batch_size`` rows) and
finished rows report at once, so clients never wait for each other's long replies.
A job the running batch cannot take (a repetition penalty the batch was started
without, or any newcomer when the engine does not preallocate its cache) stops
further joins: the batch drains and that job starts the next one, so it never
waits behind requests that arrived after it.
Text pieces and results go back through each job's callback (into an asyncio queue
for the HTTP server, a plain queue for the web page).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from ..infer.engine import Completion, EncodedPrompt, Engine, GenerationConfig
from .idle import IdleTrim

log = logging.getLogger(__name__)

Event = tuple[str, object]
# A batch that keeps taking newcomers is ended after this many requests, so its
# book-keeping (one small record per request) never grows without bound.
MAX_ROWS_PER_RUN = 4096  # ("text", str) | ("done", Completion) | ("error", Exception)


@dataclass
class Job:
    prompt: EncodedPrompt | None  # None once handed to a run
    config: GenerationConfig
    stream: bool
    on_event: Callable[[Event], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int = 16, max_wait_s: float = 0.01,
                 activity: IdleTrim | None = None):
        self.engine = engine
        self.activity = activity  # told when a run goes, so freed memory is returned once idle
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closed = False
        self._held: list[Job] = []  # the job that could not join the running batch (at most one)
        # Counters for /health and tests: rows per decoding step = row_steps / steps;
        # set_aside = requests that waited for a run to drain because they could not join it;
        # cancelled = rows stopped because their client went away.
        self.stats = {"runs": 0, "requests": 0, "steps": 0, "row_steps": 0, "set_aside": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._loop, name="vistune-engine", daemon=True)
        self._thread.start()

    # -- submitting ------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        if self._closed:
            raise RuntimeError("batcher is closed")
        self._queue.put(job)
        return job

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stream_sync(self, prompt: EncodedPrompt, config: GenerationConfig) -> Iterator[str]:
        """Text pieces of one reply, for code running in ordinary threads (the web page)."""
        events: queue.Queue[Event] = queue.Queue()
        job = self.submit(Job(prompt, config, True, events.put))
        try:
            while True:
                kind, payload = events.get()
                if kind == "text":
                    yield payload  # type: ignore[misc]
                elif kind == "done":
                    return
                else:
                    raise payload  # type: ignore[misc]
        finally:
            job.cancelled = True  # no-op when finished; stops the row if the reader went away

    async def events(self, prompt: EncodedPrompt, config: GenerationConfig, stream: bool) -> AsyncIterator[Event]:
        """Events of one job, for the asyncio server; cancels the row when abandoned."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = self.submit(Job(prompt, config, stream, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)))
        try:
            while True:
                ev = await events.get()
                yield ev
                if ev[0] != "text":
                    return
        finally:
            job.cancelled = True

    async def complete(self, prompt: EncodedPrompt, config: GenerationConfig) -> Completion:
        async for kind, payload in self.events(prompt, config, stream=False):
            if kind == "done":
                return payload  # type: ignore[return-value]
            if kind == "error":
                raise payload  # type: ignore[misc]
        raise RuntimeError("job ended without a result")

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------
    def _next_job(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _collect(self) -> list[Job] | None:
        first = self._next_job(None)
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._next_job(deadline - time.monotonic())
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # let the loop see it after this batch
                break
            batch.append(job)
        return [j for j in batch if not j.cancelled]

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            if batch and self.activity is not None:
                with self.activity.busy():
                    self._run(batch)
            elif batch:
                self._run(batch)
            del batch  # its prompts' images must not stay alive while the worker waits

    def _join_newcomers(self, run, jobs: dict[int, Job]) -> None:
        # A set-aside job waits for this run to end; admitting anyone else meanwhile
        # would keep the run alive (up to MAX_ROWS_PER_RUN requests) while later jobs
        # overtake it. So the run drains, and the set-aside job starts the next batch,
        # ahead of everything still queued (all of which arrived after it): admission
        # stays first come, first served, and its wait is bounded by the rows already
        # running.
        self._held = [j for j in self._held if not j.cancelled]
        if self._held:
            return
        while run.size < self.max_batch_size and len(run.rows) < MAX_ROWS_PER_RUN:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._queue.put(None)
                return
            if job.cancelled:
                continue
            if not run.can_join(job.config):
                self._held.append(job)
                self.stats["set_aside"] += 1
                return
            (i,) = run.add([job.prompt], [job.config], [job.stream])
            job.prompt = None
            jobs[i] = job
            self.stats["requests"] += 1

    def _run(self, batch: list[Job]) -> None:
        self.stats["runs"] += 1
        self.stats["requests"] += len(batch)
        jobs: dict[int, Job] = dict(enumerate(batch))
        try:
            run = self.engine.start([j.prompt for j in batch], [j.config for j in batch], [j.stream for j in batch])
            for j in batch:
                j.prompt = None  # the run drops its prompts after prefill; so does the job
            for deltas in run:
                self.stats["steps"] += 1
                self.stats["row_steps"] += run.step_rows
                for i, piece in deltas:
                    jobs[i].on_event(("text", piece))
                for i in run.take_finished():
                    jobs.pop(i).on_event(("done", run.completions[i]))
                for i, j in jobs.items():
                    if j.cancelled and not run.rows[i].cancelled:
                        run.cancel(i)
                        self.stats["cancelled"] += 1
                if not self._closed:
                    self._join_newcomers(run, jobs)
        except Exception as e:  # one failed batch must not take the server down
            log.exception("generation failed")
            for j in jobs.values():
                j.on_event(("error", e))
