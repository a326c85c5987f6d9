"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate, in one CPU process.

One process: on CPUs accelerate sets up no process group of its own under a DeepSpeed launch
and counts one process where DeepSpeed's world has two, so their batch sizes disagree.
ZeRO-2 runs by default (DeepSpeed is in the test extra); ZeRO-3, which takes as long again, is
marked slow."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_fixtures import tiny_config, tiny_data  # noqa: F401
from vistune.model.checkpoint import load_model
from vistune.train import run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
PROCESSES = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(zero, cfg_file, *overrides, check=True, processes=PROCESSES):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           f"configs/accelerate/deepspeed_{zero}.yaml", "--num_processes", str(processes),
           "--main_process_port", str(free_port()), "-m", "vistune.cli", "train", str(cfg_file), *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.parametrize("zero", ["zero2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_zero_matches_plain_training_and_resumes(tiny_data, tmp_path, zero):
    # PROCESSES processes of batch 4 / PROCESSES take the same global batch as one process of batch 4.
    cfg = tiny_config(tiny_data, tmp_path / "ds", {"train.max_steps": 3, "train.grad_accum": 2,
                                                   "train.save_every": 2, "train.batch_size": 4 // PROCESSES})
    cfg_file = tmp_path / "ds.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    launch(zero, cfg_file)
    plain = run(cfg.with_overrides([f"output_dir={tmp_path / 'plain'}", "train.batch_size=4"]))
    a = [json.loads(x)["loss"] for x in plain.metrics_path.read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert b == pytest.approx(a, rel=1e-5)
    assert (tmp_path / "ds" / "checkpoints" / "step-00000002" / "engine").is_dir()
    m1, _ = load_model(plain.model_dir)
    m2, _ = load_model(tmp_path / "ds" / "model")
    s2 = m2.state_dict()
    assert all((v - s2[k]).abs().max() < 1e-5 for k, v in m1.state_dict().items())
    # resume the DeepSpeed run from its step-2 checkpoint (optimizer shards and all)
    shutil.copytree(tmp_path / "ds" / "checkpoints" / "step-00000002",
                    tmp_path / "ds2" / "checkpoints" / "step-00000002")
    launch(zero, cfg_file, f"output_dir={tmp_path / 'ds2'}", "--resume")
    c = [json.loads(x)["loss"] for x in (tmp_path / "ds2" / "metrics.jsonl").read_text().splitlines()]
    assert c[-1] == pytest.approx(a[-1], rel=1e-5)


@pytest.mark.slow  # check_sharding's refusal is tested without a launch in test_train_loop.py
def test_muon_is_refused_under_zero_which_shards_its_matrices(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "m", {"train.max_steps": 1, "train.optimizer": "muon"})
    cfg_file = tmp_path / "m.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    p = launch("zero2", cfg_file, check=False)
    assert p.returncode != 0
    assert "train.optimizer muon needs whole matrices" in p.stderr
    assert not (tmp_path / "m" / "model").exists()
