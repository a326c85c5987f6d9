"""A training run in a second process, beside the demo's main line of phases.

The no-stage-1 ablation needs nothing the full pipeline makes after stage 0, so on a
machine with two cores it trains on the second one while stages 1 and 2 train on the
first. A small model's step gains little from a second thread (the quick demo's
stage-2 step: 1.33x at two threads against one), while two runs side by side, one
thread each, get close to twice the work done.

Each run uses a fixed number of threads, so the numbers stay the same from run to
run. The side run's progress bar is drawn by this process from the run's own
metrics.jsonl, one line under the main run's bar.
"""
from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..train import TrainResult, load_run_config, run
from ..train.metrics import METRICS_FILE


def split_threads(threads: int) -> tuple[int, int]:
    """(main, side) threads out of ``threads``; side is 0 where there is no core to spare."""
    if threads < 2:
        return threads, 0
    return threads - threads // 2, threads // 2


def train_preset(preset: Path, overrides: dict) -> TrainResult:
    """One `vistune train PRESET key=value ...` run; the same in either process."""
    return run(load_run_config(preset, overrides))


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class SideRun:
    """``train_preset(preset, overrides)`` in a spawned process with ``threads`` threads.

    `result()` waits for it and returns its TrainResult (an error in the run is raised
    there); `stop()` ends the process if it is still running. Spawned, not forked: a
    forked child would inherit torch's thread pools mid-use. As with any spawned process,
    a script that starts one must guard its own top level with ``if __name__ == "__main__"``.
    """

    def __init__(self, preset: Path, overrides: dict, threads: int, desc: str, total_steps: int):
        self._pool = multiprocessing.get_context("spawn").Pool(1, initializer=_start_worker, initargs=(threads,))
        # The child draws no bar of its own: two processes redrawing one terminal line garble it.
        overrides = {**overrides, "train.progress": False}
        self._async = self._pool.apply_async(train_preset, (preset, overrides))
        self._done = False
        self._metrics = Path(overrides["output_dir"]) / METRICS_FILE
        self._bar = tqdm(total=total_steps, desc=desc, unit="step", position=1, leave=False, dynamic_ncols=True)
        self._watch = threading.Thread(target=self._follow, daemon=True)
        self._watch.start()

    def _follow(self) -> None:
        seen = 0
        while not self._done and not self._async.ready():
            try:
                with open(self._metrics, "rb") as f:
                    lines = f.read().count(b"\n")
            except FileNotFoundError:
                lines = 0
            if lines > seen:
                self._bar.update(lines - seen)
                seen = lines
            time.sleep(0.5)

    def result(self) -> TrainResult:
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
