"""Work in a second process, beside the demo's main line of phases.

Stage 0's vision encoder pretrains on one thread beside the LM pretraining (`SideCall`). The
no-stage-1 ablation (`SideRun`) needs nothing the full pipeline makes after stage 0, so on a
machine with two cores it trains on the second one while stages 1 and 2 train on the
first. A small model's step gains little from a second thread, while two runs side by
side, one thread each, get close to twice the work done.

Each run uses a fixed number of threads, so the numbers stay the same from run to
run. The side work's progress bar is drawn by this process, one line under the main
line's bar, from a step counter the child shares: training's `on_step` callback, or
stage 0's own progress callback, counts each step.
"""
from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .. import runtime
from ..train import TrainResult, load_run_config, run


def split_threads(threads: int) -> tuple[int, int]:
    """(main, side) threads out of ``threads``; side is 0 where there is no core to spare."""
    if threads < 2:
        return threads, 0
    return threads - threads // 2, threads // 2


def train_preset(preset: Path, overrides: dict, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """One `vistune train PRESET key=value ...` run; the same in either process."""
    runtime.training_process()
    return run(load_run_config(preset, overrides), on_step=on_step)


def _start_worker(threads: int, counter=None) -> None:
    global _STEPS
    runtime.set_threads(threads)
    _STEPS = counter


_STEPS = None  # the child's shared step counter (a multiprocessing Value), set by _start_worker


def _count_step(*_) -> None:
    with _STEPS.get_lock():
        _STEPS.value += 1


def _call_counting(fn: Callable, args: tuple) -> object:
    return fn(*args, progress=_count_step)


def _train_counting(preset: Path, overrides: dict) -> TrainResult:
    return train_preset(preset, overrides, on_step=_count_step)


class _Beside:
    """A task in a spawned process with a fixed thread count, its progress bar drawn here.

    `result()` waits for it and returns its value (an error in the task is raised there);
    `stop()` ends the process if it is still running. Spawned, not forked: a forked child
    would inherit torch's thread pools mid-use. As with any spawned process, a script that
    starts one must guard its own top level with ``if __name__ == "__main__"``.
    """

    def __init__(self, threads: int, desc: str, total_steps: int):
        ctx = multiprocessing.get_context("spawn")
        self._counter = ctx.Value("i", 0)
        self._pool = ctx.Pool(1, initializer=_start_worker, initargs=(threads, self._counter))
        self._async = None
        self._done = False
        self._bar = tqdm(total=total_steps, desc=desc, unit="step", position=1, leave=False, dynamic_ncols=True)
        self._watch = threading.Thread(target=self._follow, daemon=True)

    def _start(self, fn: Callable, args: tuple) -> None:
        self._async = self._pool.apply_async(fn, args)
        self._watch.start()

    def _follow(self) -> None:
        seen = 0
        while not self._done and not self._async.ready():
            done = self._counter.value
            if done > seen:
                self._bar.update(done - seen)
                seen = done
            time.sleep(0.5)

    def result(self):
        try:
            return self._async.get()
        finally:
            self._done = True
            self._watch.join()
            self._bar.close()
            self._pool.close()
            self._pool.join()

    def stop(self) -> None:
        if not self._done:
            self._done = True
            self._pool.terminate()
            self._pool.join()
            self._bar.close()


class SideRun(_Beside):
    """``train_preset(preset, overrides)`` beside the main line, with ``threads`` threads; `result()`
    returns its TrainResult. Its bar counts the steps the run reports through ``on_step``."""

    def __init__(self, preset: Path, overrides: dict, threads: int, desc: str, total_steps: int):
        super().__init__(threads, desc, total_steps)
        # The child draws no bar of its own: two processes redrawing one terminal line garble it.
        self._start(_train_counting, (preset, {**overrides, "train.progress": False}))

    def result(self) -> TrainResult:
        return super().result()


class SideCall(_Beside):
    """``fn(*args, progress=...)`` beside the main line, with ``threads`` threads; `result()` returns
    its value. ``fn`` reports each step through ``progress(step, loss)``, as stage 0's pretrainings do,
    and must be importable by name (a spawned child looks it up)."""

    def __init__(self, fn: Callable, args: tuple, threads: int, desc: str, total_steps: int):
        super().__init__(threads, desc, total_steps)
        self._start(_call_counting, (fn, args))
