"""Requests that arrive together are generated together.

One worker thread owns the engine. It takes the first waiting job, waits a few
milliseconds for more, and runs them as one batch; text pieces and results go back
through each job's callback (into an asyncio queue for the HTTP server, a plain
queue for the web page). While a batch runs, new jobs wait for the next one.
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

log = logging.getLogger(__name__)

Event = tuple[str, object]  # ("text", str) | ("done", Completion) | ("error", Exception)


@dataclass
class Job:
    prompt: EncodedPrompt
    config: GenerationConfig
    stream: bool
    on_event: Callable[[Event], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int = 16, max_wait_s: float = 0.01):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closed = False
        self.batch_sizes: list[int] = []  # history, for tests and /health
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
    def _collect(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
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
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        self.batch_sizes.append(len(batch))
        finished = [False] * len(batch)
        try:
            run = self.engine.start([j.prompt for j in batch], [j.config for j in batch], [j.stream for j in batch])
            for deltas in run:
                for i, piece in deltas:
                    batch[i].on_event(("text", piece))
                for i, j in enumerate(batch):
                    if j.cancelled:
                        run.cancel(i)
            for i, c in enumerate(run.completions):
                finished[i] = True
                batch[i].on_event(("done", c))
        except Exception as e:  # one failed batch must not take the server down
            log.exception("generation failed")
            for j, done in zip(batch, finished):
                if not done:
                    j.on_event(("error", e))
