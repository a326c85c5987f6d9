"""What a run's ``output_dir`` holds, and who may write there.

A run owns the files it writes into ``output_dir`` (config, checkpoints, model,
metrics...). A new run into a folder that holds another run's files would mix the
two (checkpoint pruning keeps the higher step numbers of the old run, a resume would
continue it), so it is refused unless it resumes that run or is told to overwrite
it, which removes the old run's files first. What a killed write left (hidden
temporaries) is cleared before a run starts.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..files import remove_leftovers
from .checkpoints import CHECKPOINTS, clean_partial, list_checkpoints
from .config import ConfigError
from .metrics import CURVE_FILE, METRICS_FILE, SUMMARY_FILE
from .stages import PROJECTOR_FILE

CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
BASE_DIR = "base"  # a LoRA run's frozen base, written once per run
BAD_RECORDS_FILE = "bad_records.jsonl"
CUT_RECORDS_FILE = "cut_records.jsonl"
TRACKER_DIR = "vistune"  # the tensorboard logs of train.report_to (accelerate's project name)

# Everything a run writes into output_dir, except the feature cache: it is checked against the model and
# data it was built from, so a later run reuses it only where it fits.
RUN_FILES = (CONFIG_FILE, CHECKPOINTS, MODEL_DIR, BASE_DIR, METRICS_FILE, SUMMARY_FILE, CURVE_FILE, PROJECTOR_FILE,
             BAD_RECORDS_FILE, CUT_RECORDS_FILE, TRACKER_DIR)


def run_files(out: str | Path) -> list[str]:
    """The names in ``out`` that an earlier run wrote."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


def earlier_run(out: str | Path) -> list[str]:
    """What marks ``out`` as holding a run (its config, which a run writes first, a checkpoint, a
    model); empty for a new folder, or one that holds other files only."""
    out = Path(out)
    found = [name for name in (CONFIG_FILE, MODEL_DIR) if (out / name).exists()]
    return found + [CHECKPOINTS] * bool(list_checkpoints(out))


def clean_interrupted_writes(out: str | Path) -> None:
    """Remove the temporaries a run killed while writing left (a half-written model, checkpoint, file)."""
    out = Path(out)
    remove_leftovers(out)
    clean_partial(out)


def claim(out: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Make ``out`` this run's: refuse it when it holds another run (`check_claim`), or remove that
    run's files (``overwrite``; files of a folder that holds no run are never touched). Call on one
    process, after every process has run `check_claim`."""
    check_claim(out, resume=resume, overwrite=overwrite)
    if overwrite and earlier_run(out):
        out = Path(out)
        for name in run_files(out):
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def check_claim(out: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Raise ConfigError where a run may not write into ``out``; changes nothing.

    ``resume``: None (a new run), "inside" (from a checkpoint in ``out``: its files are this
    run's own), "elsewhere" (from another folder's checkpoint) or "nothing" (asked to resume,
    but ``out`` has no checkpoint)."""
    found = earlier_run(out)
    if not found or resume == "inside" or overwrite:
        return
    if resume == "nothing":
        raise ConfigError(f"--resume: output_dir {out} holds a run ({', '.join(found)}) but no checkpoint to "
                          "continue it from (train.save_every); start it again with --overwrite "
                          "(train.overwrite=true), or write to a new output_dir")
    what = "a resume from another folder's checkpoint" if resume == "elsewhere" else "a new run"
    raise ConfigError(f"output_dir {out} holds another run ({', '.join(found)}): {what} would mix with it. "
                      "Continue that run with --resume, write to a new output_dir, or pass --overwrite "
                      "(train.overwrite=true) to remove its files first")
