"""Two-stage training (feature alignment, instruction tuning) on accelerate.

    from vistune.train import load_run_config, run
    result = run(load_run_config("configs/tiny-cpu-stage1.yaml", ["train.epochs=2"]))
    result.model_dir, result.final_loss, result.metrics_path
"""
from __future__ import annotations

from .config import ConfigError, DataConfig, LoraSpec, ModelSpec, RunConfig, TrainConfig, load_run_config

__all__ = ["ConfigError", "DataConfig", "LoraSpec", "ModelSpec", "RunConfig", "TrainConfig", "TrainResult",
           "TooManyBadRecords", "load_run_config", "run"]


def __getattr__(name):
    # The loop imports accelerate; keep `import vistune.train` (and config loading) light.
    if name in ("run", "TrainResult", "TooManyBadRecords", "Trainer"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
