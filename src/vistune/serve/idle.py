"""Giving freed memory back to the OS once the server has been idle for a moment.

An inference process keeps freed heap memory for reuse (`runtime.inference_process`), which
makes a busy server faster but leaves it at the size of its largest burst (decoded
images, a batch's activations) for good. Work marks itself `busy`; when nothing has
been busy for ``idle_s``, one trim returns what is free, so a server that sits idle
after a burst is back near its baseline, and a busy one keeps its pages.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator


class IdleTrim:
    def __init__(self, idle_s: float, trim: Callable[[], object]):
        """``trim`` hands free memory back (the server passes `runtime.release_freed_memory`)."""
        self.idle_s = idle_s
        self.trim = trim
        self.trims = 0  # for /health and tests
        self._busy = 0
        self._dirty = False  # something ran since the last trim
        self._last = time.monotonic()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vistune-trim", daemon=True)
        self._thread.start()

    @contextmanager
    def busy(self) -> Iterator[None]:
        with self._cv:
            self._busy += 1
            self._dirty = True
        try:
            yield
        finally:
            with self._cv:
                self._busy -= 1
                self._last = time.monotonic()
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed:
                    idle_for = time.monotonic() - self._last
                    if self._dirty and self._busy == 0 and idle_for >= self.idle_s:
                        break
                    self._cv.wait(None if not self._dirty or self._busy else self.idle_s - idle_for)
                if self._closed:
                    return
                self._dirty = False
            self.trim()
            self.trims += 1
