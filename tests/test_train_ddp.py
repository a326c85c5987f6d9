"""Data parallelism: 2 CPU processes (gloo, under torchrun) take the same steps as 1 process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_fixtures import tiny_config, tiny_data  # noqa: F401
from vistune.model.checkpoint import load_model
from vistune.train import run

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    # Mixed data (text-only records too) and grouping: some micro-batches leave the
    # projector unused on one process, which plain DDP would refuse.
    common = {"train.max_steps": 3, "train.grad_accum": 2, "data.group_by_length": True}
    one = run(tiny_config(tiny_data, tmp_path / "one", {**common, "train.batch_size": 4}))
    two_cfg = tiny_config(tiny_data, tmp_path / "two", {**common, "train.batch_size": 2})
    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(yaml.safe_dump(two_cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "vistune.cli", "train", str(cfg_file)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 steps") == 1  # only the main process reports
    a = [json.loads(x) for x in one.metrics_path.read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]  # the same samples at every step
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    # Records cut to data.max_length on either process are gathered into the main one's report.
    cut_two = {json.loads(x)["id"] for x in (tmp_path / "two" / "cut_records.jsonl").read_text().splitlines()}
    assert cut_two and cut_two == {c["id"] for c in one.cut_records}
    m1, _ = load_model(one.model_dir)
    m2, _ = load_model(tmp_path / "two" / "model")
    s2 = m2.state_dict()
    for k, v in m1.state_dict().items():
        assert (v - s2[k]).abs().max() < 1e-5, k
