import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from train_fixtures import subset, tiny_config, tiny_data  # noqa: F401
from vistune.model.checkpoint import load_model
from vistune.train import TooManyBadRecords, run
from vistune.train.checkpoints import latest_checkpoint, list_checkpoints

SRC = Path(__file__).resolve().parents[1] / "src"


def with_bad_records(tiny_data, path: Path) -> tuple[Path, set[str]]:
    """Twelve good records plus a missing image, an undecodable image and an over-long sample."""
    subset(tiny_data["pretrain"], path, 12)
    junk = path.parent / "junk.png"
    junk.write_bytes(b"not a png at all")
    image = json.loads(path.read_text().splitlines()[0])["image"]
    bad = [
        {"id": "missing-img", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red."}]},
        {"id": "junk-img", "image": str(junk), "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red."}]},
        {"id": "too-long", "image": [image] * 5, "conversations": [  # 5 x 16 image tokens > 64
            {"from": "human", "value": "<image>" * 5}, {"from": "gpt", "value": "red."}]},
    ]
    with open(path, "a") as f:
        for r in bad:
            f.write(json.dumps(r) + "\n")
    return path, {r["id"] for r in bad}


def test_bad_records_are_skipped_counted_and_reported(tiny_data, tmp_path):
    data, bad_ids = with_bad_records(tiny_data, tmp_path / "mixed.jsonl")
    cfg = tiny_config(tiny_data, tmp_path / "run", {"data.train": str(data), "data.max_length": 64,
                                                     "train.max_bad_records": 3}, stage=1)
    r = run(cfg)
    assert {b["id"] for b in r.bad_records} == bad_ids
    reasons = {b["id"]: b["reason"] for b in r.bad_records}
    assert "nope.png" in reasons["missing-img"] and "junk.png" in reasons["junk-img"]
    assert r.steps == 4  # 15 records / batch 4; steps with bad records still train on the rest
    logged = [json.loads(x) for x in (r.output_dir / "bad_records.jsonl").read_text().splitlines()]
    assert {b["id"] for b in logged} == bad_ids
    summary = r.summary_path.read_text()
    assert "Skipped records (3)" in summary and "missing-img" in summary
    rows = [json.loads(x) for x in r.metrics_path.read_text().splitlines()]
    assert rows[-1]["bad_records"] == 3 and all(row["loss"] > 0 for row in rows)

    # One bad record fewer allowed than met: the run stops, naming them.
    cfg = cfg.with_overrides(["train.max_bad_records=2", f"output_dir={tmp_path / 'run2'}"])
    with pytest.raises(TooManyBadRecords, match=r"3 bad records of 15, over the 2 that train.max_bad_records allows.*'(missing-img|junk-img|too-long)'"):
        run(cfg)
    # As a fraction of the data set: 3 / 15 = 20 % > 10 %
    with pytest.raises(TooManyBadRecords, match=r"of 15, over the 1 that train.max_bad_records allows"):
        run(cfg.with_overrides(["train.max_bad_records=0.1"]), overwrite=True)


def _config_file(tiny_data, tmp_path, out: Path) -> tuple[Path, object]:
    # Dropout on: resuming must restore the RNG too, not only weights and optimizer.
    cfg = tiny_config(tiny_data, out, {"data.train": str(tiny_data["pretrain"]), "train.epochs": 2,
                                       "train.batch_size": 2, "train.grad_accum": 2, "train.save_every": 3,
                                       "train.keep_last": 2, "train.llm": "full", "train.warmup_ratio": 0.1,
                                       "model.llm.attention_dropout": 0.2, "train.seed": 7}, stage=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path, cfg


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_data, tmp_path):
    out = tmp_path / "killed"
    cfg_file, cfg = _config_file(tiny_data, tmp_path, out)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "vistune.cli", "train", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and latest_checkpoint(out) is None:
            time.sleep(0.02)
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists()
    at = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["step"]
    total = 12  # 24 records / (2 x 2) per step x 2 epochs
    assert 3 <= at < total

    resumed = run(cfg, resume="auto")
    assert resumed.resumed_from is not None and resumed.steps == total
    straight = run(cfg.with_overrides([f"output_dir={tmp_path / 'straight'}"]))
    a = [json.loads(x) for x in resumed.metrics_path.read_text().splitlines()]
    b = [json.loads(x) for x in straight.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in a] == list(range(1, total + 1)) == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5), ra["step"]
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-6)
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-4)
    # keep_last=2, and no temporary directories left behind by the kill
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["step-00000009", "step-00000012"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="FSDP does run on GPUs")
def test_an_fsdp_launch_on_cpus_is_refused_not_run_as_lone_processes(tiny_data, tmp_path, monkeypatch):
    # What `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets: on a CPU accelerate
    # builds no process group, and each process would train alone believing it is rank 0.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = tiny_config(tiny_data, tmp_path / "f", {"train.max_steps": 1}, stage=1)
    with pytest.raises(Exception, match=r"FSDP launch, but accelerate set up NO on cpu: FSDP needs GPUs"):
        run(cfg)
    assert not (tmp_path / "f" / "model").exists()


class GradNorms:
    """The gradient norm each AdamW step meets (a global step pre-hook: it sees what clipping left)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def __call__(self, opt, args, kwargs) -> None:
        if type(opt) is not torch.optim.AdamW:
            return  # accelerate's wrapper steps the same AdamW: count it once
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))

    def __enter__(self) -> "GradNorms":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _rows(r) -> list[dict]:
    return [json.loads(x) for x in r.metrics_path.read_text().splitlines()]


def test_lr_warms_up_then_follows_the_cosine_and_clipping_bounds_the_update(tiny_data, tmp_path):
    # 6 steps, warmup ceil(0.34 * 6) = 3; max_grad_norm 1e-3 is far below any real norm, so every
    # step clips; 1e9 never does.
    common = {"train.max_steps": 6, "train.warmup_ratio": 0.34, "train.scheduler": "cosine", "train.lr": 1e-3}
    with GradNorms() as clipped_seen:
        clipped = _rows(run(tiny_config(tiny_data, tmp_path / "clip", {**common, "train.max_grad_norm": 1e-3})))
    with GradNorms() as free_seen:
        free = _rows(run(tiny_config(tiny_data, tmp_path / "free", {**common, "train.max_grad_norm": 1e9})))

    # metrics.jsonl's lr is the rate each step applied: 0, 1/3, 2/3 of lr, then cosine down from lr.
    expected = [k / 3 if k < 3 else 0.5 * (1 + math.cos(math.pi * (k - 3) / 3)) for k in range(6)]
    assert [r["lr"] for r in clipped] == pytest.approx([1e-3 * f for f in expected], rel=1e-9, abs=1e-15)
    assert [r["lr"] for r in free] == [r["lr"] for r in clipped]

    # The logged grad_norm is the norm before clipping: the same in both runs at step 1 (same weights,
    # same batch), and far above the 1e-3 the clipped run's optimizer actually met.
    assert clipped[0]["grad_norm"] == pytest.approx(free[0]["grad_norm"], rel=1e-6)
    assert len(clipped_seen.seen) == len(free_seen.seen) == 6
    for row, seen in zip(clipped, clipped_seen.seen):
        assert row["grad_norm"] > 100 * 1e-3
        assert seen == pytest.approx(1e-3, rel=1e-3)  # the update used clipped gradients
    for row, seen in zip(free, free_seen.seen):
        assert seen == pytest.approx(row["grad_norm"], rel=1e-5)  # unclipped: what was logged


@pytest.mark.parametrize("scheduler,after_warmup", [("constant", [1, 1, 1]), ("wsd", [1, 2 / 3, 1 / 3])])
def test_constant_and_wsd_schedulers_hold_the_rate_after_warmup(tiny_data, tmp_path, scheduler, after_warmup):
    # wsd with decay_ratio 0.5 of 6 steps: the last 3 steps fall linearly towards 0
    cfg = tiny_config(tiny_data, tmp_path / "c", {"train.max_steps": 6, "train.warmup_ratio": 0.34,
                                                   "train.scheduler": scheduler, "train.decay_ratio": 0.5,
                                                   "train.lr": 1e-3})
    rows = _rows(run(cfg))
    expected = [0, 1 / 3, 2 / 3] + after_warmup
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f for f in expected], rel=1e-9, abs=1e-15)


def test_grad_accum_equals_one_big_batch(tiny_data, tmp_path):
    # 2 micro-batches of 4 per step = 1 batch of 8: every step averages over the supervised tokens of
    # its whole window, not over micro-batch means (the records' answers differ in length).
    common = {"train.max_steps": 3, "train.lr": 3e-3, "data.shuffle": True}
    accum = run(tiny_config(tiny_data, tmp_path / "accum", {**common, "train.batch_size": 4, "train.grad_accum": 2}))
    big = run(tiny_config(tiny_data, tmp_path / "big", {**common, "train.batch_size": 8}))
    a, b = _rows(accum), _rows(big)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # the same samples at every step
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    m1, _ = load_model(accum.model_dir)
    m2, _ = load_model(big.model_dir)
    s2 = m2.state_dict()
    for k, v in m1.state_dict().items():
        assert (v - s2[k]).abs().max() < 1e-5, k
    # and the steps did learn something, so equal weights are not just two untouched models
    assert a[-1]["loss"] < a[0]["loss"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed (test extra)")
def test_report_to_tensorboard_writes_the_losses_of_metrics_jsonl(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = run(tiny_config(tiny_data, tmp_path / "tb", {"train.max_steps": 3, "train.report_to": ["tensorboard"]},
                        stage=1))
    events = sorted(r.output_dir.rglob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(r.output_dir) for p in r.output_dir.rglob("*"))
    scalars: dict[str, list] = {}
    for ev in events:  # one file per writer (accelerate's run, its hparams)
        acc = EventAccumulator(str(ev))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    rows = _rows(r)
    assert [e.step for e in scalars["loss"]] == [1, 2, 3]
    assert [e.value for e in scalars["loss"]] == pytest.approx([row["loss"] for row in rows], rel=1e-6)
    assert [e.value for e in scalars["lr"]] == pytest.approx([row["lr"] for row in rows], rel=1e-6)


def test_sharded_engines_refuse_compile_and_muon_before_the_model_is_built():
    from accelerate.utils import DistributedType

    from vistune.train.config import ConfigError, TrainConfig
    from vistune.train.loop import check_sharding

    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        assert check_sharding(kind, TrainConfig()) is True
        with pytest.raises(ConfigError, match="train.compile compiles the LM in this process"):
            check_sharding(kind, TrainConfig(compile=True))
        with pytest.raises(ConfigError, match="train.optimizer muon needs whole matrices"):
            check_sharding(kind, TrainConfig(optimizer="muon"))
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU):  # one process, or DDP: whole models
        assert check_sharding(kind, TrainConfig(compile=True, optimizer="muon")) is False


def test_records_cut_to_max_length_are_named_once_and_survive_a_resume(tiny_data, tmp_path):
    from vistune.data.records import RecordFile
    from vistune.text.encode import encode_conversation
    from vistune.train.stages import build_model

    cfg = tiny_config(tiny_data, tmp_path / "run", {"train.epochs": 2, "train.save_every": 100})
    _, tok = build_model(cfg)
    records = RecordFile(cfg.data.train)
    img = tok.convert_tokens_to_ids("<image>")
    over = {}  # what the run must report: each record's tokens beyond data.max_length, from its untruncated encoding
    for i in range(len(records)):
        r = records[i]
        n = len(encode_conversation(tok, "v0", r.conversations, image_token_id=img, num_image_tokens=16).input_ids)
        if n > cfg.data.max_length:
            over[r.id] = n - cfg.data.max_length
    assert 0 < len(over) < len(records)

    r = run(cfg)
    assert {c["id"]: c["tokens"] for c in r.cut_records} == over  # each once, though read in both epochs
    assert len(r.cut_records) == len(over) and not r.bad_records
    logged = [json.loads(x) for x in (r.output_dir / "cut_records.jsonl").read_text().splitlines()]
    assert {c["id"]: c["tokens"] for c in logged} == over
    assert f"| records cut to data.max_length | {len(over)} (cut_records.jsonl) |" in r.summary_path.read_text()

    # Resumed from its last checkpoint, a run trains no step and still knows what was cut before.
    again = run(cfg.with_overrides([f"output_dir={tmp_path / 'again'}"]), resume=str(latest_checkpoint(r.output_dir)))
    assert again.resumed_from is not None and {c["id"]: c["tokens"] for c in again.cut_records} == over

    # Records that fit are not reported.
    fits = run(cfg.with_overrides([f"output_dir={tmp_path / 'fits'}", "data.max_length=256", "train.epochs=1"]))
    assert fits.cut_records == [] and not (fits.output_dir / "cut_records.jsonl").exists()
    assert "| records cut to data.max_length | 0 |" in fits.summary_path.read_text()


def test_on_step_reports_every_step_with_its_loss_and_the_total(tiny_data, tmp_path):
    seen = []
    cfg = tiny_config(tiny_data, tmp_path / "run", {"train.max_steps": 3, "train.log_every": 2}, stage=1)
    r = run(cfg, on_step=seen.append)
    assert [e["step"] for e in seen] == [1, 2, 3]  # every step, not only the logged ones
    assert all(e["total_steps"] == 3 and e["loss"] > 0 for e in seen)
    assert seen[-1]["loss"] == r.final_loss
