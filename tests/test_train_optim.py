import copy
import json
import math

import pytest
import torch

from conftest import make_model
from train_fixtures import base_model_dir, tiny_config, tiny_data  # noqa: F401
from vistune.train import ConfigError, run
from vistune.train.checkpoints import list_checkpoints
from vistune.train import optim
from vistune.model.checkpoint import load_model
from vistune.train.optim import (Muon, MuonAdamW, build_optimizer, build_scheduler, muon_matrices,
                                   orthogonalize)
from vistune.train.stages import apply_modes
from tolerances import assert_reordered


def _names(model, ids):
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("text", ["llama", "gpt2"])
def test_muon_takes_the_linear_matrices_and_leaves_embeddings_heads_and_norms_to_adamw(tokenizer, text):
    model, _ = make_model(tokenizer, text=text)
    names = _names(model, muon_matrices(model))
    assert names, "no matrix for Muon"
    assert any(n.startswith("projector.") for n in names)
    assert any(n.startswith("language_model.") for n in names)
    for n in names:
        p = dict(model.named_parameters())[n]
        assert p.ndim == 2
        assert not any(k in n for k in ("embed", "wte", "wpe", "lm_head", "norm", "ln_")), n
    # GPT-2 ties its head to the token embedding: that matrix stays on AdamW too.
    emb = model.language_model.get_input_embeddings().weight
    assert id(emb) not in muon_matrices(model)


def test_a_muon_step_moves_only_what_learns_and_follows_the_scheduler(tokenizer, tiny_data, tmp_path):
    model, _ = make_model(tokenizer)
    cfg = tiny_config(tiny_data, tmp_path, {"train.optimizer": "muon", "train.lr": 1e-3, "train.muon_lr": 2e-3},
                      stage=1)
    apply_modes(model, cfg)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    assert {g["name"] for g in opt.muon.param_groups} == {"projector/muon"}
    assert all(g["lr"] == 2e-3 for g in opt.muon.param_groups)
    assert all(g["lr"] == 1e-3 for g in opt.adamw.param_groups)  # the projector's biases
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(1e-3)  # the scheduler reaches Muon's groups
    x = torch.randn(3, model.projector[0].in_features)
    model.projector(x).square().sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == n.startswith("projector."), n


def _one_step(model, opt, seed):
    torch.manual_seed(seed)
    x = torch.randn(4, model.projector[0].in_features)
    model.projector(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_the_muon_state_round_trips_so_a_resumed_run_continues_exactly(tokenizer, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, {"train.optimizer": "muon", "train.lr": 1e-3}, stage=1)
    a, _ = make_model(tokenizer)
    apply_modes(a, cfg)
    opt_a = build_optimizer(a, cfg)
    _one_step(a, opt_a, 0)
    b, _ = make_model(tokenizer)
    apply_modes(b, cfg)
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read back from a checkpoint
    _one_step(a, opt_a, 1)
    _one_step(b, opt_b, 1)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    adamw = torch.optim.AdamW(a.projector.parameters())
    with pytest.raises(ValueError, match="not a Muon"):
        opt_b.load_state_dict(adamw.state_dict())


def test_a_stage2_run_with_muon_learns_and_resumes_from_its_checkpoint(tiny_data, base_model_dir, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "m", {"model": {"from": str(base_model_dir)}, "train.max_steps": 12,
                                                  "train.optimizer": "muon", "train.lr": 3e-3,
                                                  "train.save_every": 6, "train.keep_last": 3})
    straight = run(cfg)
    rows = [json.loads(x) for x in straight.metrics_path.read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert "optimizer: muon" in (straight.output_dir / "config.yaml").read_text()
    # From the step-6 checkpoint (optimizer.pt read back with weights_only=True), steps 7-12 repeat.
    half = list_checkpoints(straight.output_dir)[0]
    resumed = run(cfg.with_overrides([f"output_dir={tmp_path / 'r'}"]), resume=str(half))
    again = [json.loads(x) for x in resumed.metrics_path.read_text().splitlines()]
    tail = [r for r in again if r["step"] > 6]
    assert [r["step"] for r in tail] == list(range(7, 13))
    assert [r["loss"] for r in tail] == pytest.approx(losses[6:], rel=1e-4, abs=1e-5)


def test_unknown_optimizer_and_negative_muon_rate_are_refused(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="train.optimizer must be adamw or muon"):
        tiny_config(tiny_data, tmp_path, {"train.optimizer": "sgd"})
    with pytest.raises(ConfigError, match="train.muon_lr must be >= 0"):
        tiny_config(tiny_data, tmp_path, {"train.muon_lr": -1.0})


def _two_steps(opt_cls, params, grads, **kw):
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls([{"params": params, "lr": 0.02, "weight_decay": 0.1}], **kw)
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
    return params, opt


def test_muon_equals_torchs_where_bf16_is_native_and_runs_fp32_where_it_is_not(monkeypatch):
    torch.manual_seed(0)
    # Matrices of one shape are orthogonalised as one stack: still torch's rule, matrix by matrix.
    params = [torch.randn(24, 8), torch.randn(8, 24), torch.randn(16, 16), torch.randn(16, 16), torch.randn(24, 8)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
    reference, ref_opt = _two_steps(torch.optim.Muon, params, grads, adjust_lr_fn="match_rms_adamw")

    monkeypatch.setattr(optim, "bf16_on", lambda device: (True, "test"))
    ours, opt = _two_steps(Muon, params, grads)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)  # torch's rule, bit for bit
    assert all(torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])
               for a, b in zip(ours, reference))

    # Emulated bf16 is dozens of times slower than fp32: there the iteration runs in fp32.
    seen = []
    real = optim.orthogonalize
    monkeypatch.setattr(optim, "bf16_on", lambda device: (False, "test"))
    monkeypatch.setattr(optim, "orthogonalize", lambda *a: seen.append(a[-1]) or real(*a))
    fp32, _ = _two_steps(Muon, params, grads)
    assert set(seen) == {torch.float32}
    for a, b, p0 in zip(fp32, reference, params):
        assert not torch.equal(a, b)
        # bf16's rounding is the only difference: small against the step itself.
        assert (a - b).norm() < 0.05 * (b - p0).norm()


def test_orthogonalize_flattens_the_spectrum_of_wide_and_tall_matrices():
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16)]:
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k))
        g = u @ torch.diag(torch.logspace(-2, 0, k)) @ v.T  # singular values from 0.01 to 1
        o = orthogonalize(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
        assert o.shape == g.shape and o.dtype == g.dtype
        s = torch.linalg.svdvals(o)
        # the quintic iteration aims at ~1 for every direction, not exactly 1 (torch's docstring)
        assert s.min() > 0.3 and s.max() < 1.3, s
        assert torch.linalg.svdvals(g).min() < 0.011


def test_orthogonalize_of_a_stack_is_each_matrix_orthogonalised_alone():
    torch.manual_seed(0)
    for shape in [(3, 16, 48), (2, 48, 16)]:
        g = torch.randn(shape)
        g[1] *= 100.0  # each matrix is normalised by its own norm, not the stack's
        stacked = orthogonalize(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
        for i in range(shape[0]):
            alone = orthogonalize(g[i], (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
            # baddbmm against addmm: five iterations of two 48-term products each, summed in other blocks.
            assert_reordered(stacked[i], alone, terms=48, depth=10)


def test_muon_refuses_another_rate_scaling():
    with pytest.raises(ValueError, match="match_rms_adamw"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], adjust_lr_fn="original")


RATES = {"vision": 1e-4, "projector": 2e-3, "llm": 3e-4}


def _schedule_factor(k: int, warmup: int, total: int) -> float:
    """Linear warmup 0 -> 1, then cosine to 0 at ``total`` (written out, not transformers')."""
    if k < warmup:
        return k / warmup
    return 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


@pytest.mark.parametrize("optimizer,muon_lr", [("adamw", None), ("muon", None), ("muon", 5e-3)])
def test_per_module_rates_reach_every_param_group_and_the_schedule_scales_each(tokenizer, tiny_data, tmp_path,
                                                                              optimizer: str, muon_lr: float | None):
    # train.lr is a decoy: every module has its own rate, so no group may carry it.
    cfg = tiny_config(tiny_data, tmp_path, {"train.vision": "full", "train.llm": "full", "train.lr": 0.7,
                                            "train.vision_lr": RATES["vision"], "train.projector_lr": RATES["projector"],
                                            "train.llm_lr": RATES["llm"], "train.optimizer": optimizer,
                                            "train.muon_lr": muon_lr, "train.warmup_ratio": 0.25})
    model, _ = make_model(tokenizer)
    apply_modes(model, cfg)
    opt = build_optimizer(model, cfg)
    groups = opt.param_groups
    expected = {}
    for g in groups:
        part, kind = g["name"].split("/")
        expected[g["name"]] = muon_lr if kind == "muon" and muon_lr is not None else RATES[part]
        assert g["lr"] == expected[g["name"]], g["name"]
    # every module's parameters are in some group, under its own rate
    assert {g["name"].split("/")[0] for g in groups} == set(RATES)
    if optimizer == "muon":
        assert {g["name"] for g in opt.muon.param_groups} == {f"{p}/muon" for p in RATES}
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}

    total = 8
    sched = build_scheduler(opt, cfg.train, total)  # what the loop builds: warmup ceil(0.25 * 8) = 2 steps
    for k in range(total + 1):
        f = _schedule_factor(k, 2, total)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected[g["name"]] * f, rel=1e-9, abs=1e-15), (k, g["name"])
        opt.step()  # no gradients: nothing moves, but the scheduler expects a step first
        sched.step()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_module_whose_rate_is_zero_stays_put_in_a_run(tiny_data, base_model_dir, tmp_path, optimizer: str):
    # All three modules learn, but only the LLM has a rate: if the loop fell back to train.lr
    # anywhere, the tower or the projector would move.
    cfg = tiny_config(tiny_data, tmp_path / "run", {
        "model": {"from": str(base_model_dir)}, "train.vision": "full", "train.lr": 1e-2, "train.vision_lr": 0.0,
        "train.projector_lr": 0.0, "train.llm_lr": 1e-3, "train.weight_decay": 0.1, "train.max_steps": 2,
        "train.optimizer": optimizer})
    r = run(cfg)
    before, _ = load_model(base_model_dir)
    after, _ = load_model(r.model_dir)
    b = before.state_dict()
    moved = {k.split(".")[0] for k, v in after.state_dict().items() if not torch.equal(v, b[k])}
    assert moved == {"language_model"}


def test_lr_factor_warms_up_then_decays_or_holds():
    f = {name: optim.lr_factor(name, 2, 6) for name in ("cosine", "linear", "constant")}
    assert [f["constant"](k) for k in range(7)] == [0, 0.5, 1, 1, 1, 1, 1]
    assert [f["linear"](k) for k in range(7)] == [0, 0.5, 1, 0.75, 0.5, 0.25, 0]
    assert [f["cosine"](k) for k in range(7)] == pytest.approx([0, 0.5, 1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                                 0.5 * (1 + math.cos(3 * math.pi / 4)), 0], abs=1e-12)
    # wsd: the peak until the last `decay` steps, then linearly to 0
    assert [optim.lr_factor("wsd", 2, 10, 4)(k) for k in range(11)] == [0, 0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    # a warmup that starts at 1/warmup, then the same schedule
    assert [optim.lr_factor("linear", 2, 6, warmup_from_zero=False)(k) for k in range(7)] == [0.5, 1, 1, 0.75, 0.5, 0.25, 0]
    with pytest.raises(ConfigError, match="train.scheduler must be one of cosine, linear, constant, wsd, got 'step'"):
        optim.lr_factor("step", 2, 6)


def test_building_a_scheduler_imports_neither_peft_nor_bitsandbytes():
    # transformers' scheduler module pulls in peft and, through it, bitsandbytes, which warns on
    # AVX512-BF16 CPUs that it cannot fetch a kernel: noise in every run that uses neither.
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from vistune.train.config import TrainConfig\n"
            "from vistune.train.optim import build_scheduler\n"
            "opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)\n"
            "build_scheduler(opt, TrainConfig(), 10)\n"
            "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
