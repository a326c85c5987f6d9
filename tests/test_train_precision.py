import pytest
import torch

from vistune.train.config import ConfigError
from vistune.train.precision import autocast


def test_autocast_follows_the_run_precision():
    x = torch.randn(4, 4)
    with autocast("bf16"):
        assert (x @ x).dtype == torch.bfloat16
    for precision in ("fp32", "auto"):  # auto on CPU: fp32, as the trainer runs it
        with autocast(precision):
            assert (x @ x).dtype == torch.float32
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        autocast("fp16")
