import json

import pytest
import torch

from tolerances import assert_trained_alike
from train_fixtures import base_model_dir, subset, tiny_config, tiny_data  # noqa: F401
from vistune.model.checkpoint import load_model
from vistune.train import run
from vistune.train.stages import load_projector


def weights(path):
    model, _ = load_model(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def split(state):
    parts = {"vision": {}, "projector": {}, "language_model": {}}
    for k, v in state.items():
        parts[k.split(".")[0]][k] = v
    return parts


def test_stage1_changes_only_the_projector_then_stage2_loads_it(tiny_data, base_model_dir, tmp_path):
    before = split(weights(base_model_dir))
    cfg1 = tiny_config(tiny_data, tmp_path / "s1", {"model": {"from": str(base_model_dir)}, "train.max_steps": 3},
                       stage=1)
    r1 = run(cfg1)
    after = split(weights(r1.model_dir))
    for part in ("vision", "language_model"):
        assert after[part].keys() == before[part].keys()
        changed = [k for k in before[part] if not torch.equal(before[part][k], after[part][k])]
        assert changed == [], f"stage 1 changed frozen {part} weights: {changed[:3]}"
    for k, v in before["projector"].items():
        assert not torch.equal(v, after["projector"][k]), f"stage 1 did not train {k}"
    # the model remembers the stage's template; the projector-only file holds what was trained
    assert json.loads((r1.model_dir / "config.json").read_text())["template"] == "plain"
    fresh, _ = load_model(base_model_dir)
    load_projector(fresh, r1.projector_path)
    for k, v in fresh.projector.state_dict().items():
        assert torch.equal(v, after["projector"][f"projector.{k}"])
    assert (r1.output_dir / "config.yaml").exists() and (r1.output_dir / "loss_curve.png").stat().st_size > 1000
    rows = [json.loads(x) for x in r1.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)

    # Stage 2 from the base + the stage-1 projector: with lr 0 the projector is exactly the loaded one...
    cfg0 = tiny_config(tiny_data, tmp_path / "s2lr0", {"model": {"from": str(base_model_dir)},
                                                          "model.projector_from": str(r1.projector_path),
                                                          "train.max_steps": 1, "train.lr": 0.0})
    r0 = run(cfg0)
    got = split(weights(r0.model_dir))["projector"]
    assert all(torch.equal(got[k], after["projector"][k]) for k in got)
    # ...and with a learning rate, the LLM and projector learn while the tower stays untouched.
    cfg2 = tiny_config(tiny_data, tmp_path / "s2", {"model": {"from": str(base_model_dir)},
                                                       "model.projector_from": str(r1.projector_path),
                                                       "train.max_steps": 2})
    r2 = run(cfg2)
    s2 = split(weights(r2.model_dir))
    assert all(torch.equal(s2["vision"][k], before["vision"][k]) for k in before["vision"])
    llm_changed = [k for k in before["language_model"] if not torch.equal(s2["language_model"][k],
                                                                         before["language_model"][k])]
    assert len(llm_changed) >= len(before["language_model"]) // 2
    assert any(not torch.equal(s2["projector"][k], after["projector"][k]) for k in after["projector"])
    assert json.loads((r2.model_dir / "config.json").read_text())["template"] == "v0"


def test_a_tiny_model_learns_a_small_repeated_batch(tiny_data, tmp_path):
    data = subset(tiny_data["instruct"], tmp_path / "four.jsonl", 4, keep=lambda r: "image" in r)
    cfg = tiny_config(tiny_data, tmp_path / "learn", {
        "data.train": str(data), "data.template": "plain", "train.vision": "full", "train.epochs": 30,
        "train.lr": 3e-3, "train.batch_size": 4, "train.scheduler": "constant"})
    r = run(cfg)
    assert r.steps == 30
    assert r.final_loss < 0.3 * r.first_loss, (r.first_loss, r.final_loss)


def test_bf16_and_fp16_options(tiny_data, base_model_dir, tmp_path, monkeypatch, caplog):
    import importlib.util
    import logging

    from vistune.train import setup

    import pytest

    from vistune.train import ConfigError

    def losses(name, extra):
        cfg = tiny_config(tiny_data, tmp_path / name, {"model": {"from": str(base_model_dir)}, "train.max_steps": 2,
                                                       **extra})
        return [json.loads(x)["loss"] for x in run(cfg).metrics_path.read_text().splitlines()]

    ref = losses("ref", {})
    monkeypatch.setattr(setup, "bf16_support", lambda: (False, "the CPU has no native bf16"))
    with caplog.at_level(logging.WARNING, logger="vistune.train"):
        bf16 = losses("bf16", {"train.precision": "bf16"})  # autocast on CPU
    assert bf16 == pytest.approx(ref, rel=3e-2) and bf16 != ref
    assert "bf16 is emulated" in caplog.text  # a CPU without native bf16: the user is told it is slow
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        losses("fp16", {"train.precision": "fp16"})
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(ConfigError, match="tensorboard is not installed"):
            losses("tb", {"train.report_to": ["tensorboard"]})


class Observed:
    """What a run's LLM did, seen from outside: MLP calls per layer, and the gradients each step met."""

    def __init__(self) -> None:
        self.mlp_calls: dict[str, int] = {}
        self.layer_modes: list[tuple[bool, bool]] = []  # (checkpointing on, layer in training mode)
        self.submodules_training: set[str] = set()
        self.grads: list[list[torch.Tensor]] = []

    def watch(self, model) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        for name, m in model.language_model.named_modules():
            if isinstance(m, GradientCheckpointingLayer):
                self.layer_modes.append((m.gradient_checkpointing, m.training))
            elif m.training:
                self.submodules_training.add(name)
            if name.endswith(".mlp"):
                self.mlp_calls[name] = 0
                # a pre-hook: a checkpointed backward stops recomputing once it has every tensor it needs,
                # which under a frozen MLP comes before the MLP's end (a forward hook would not fire)
                m.register_forward_pre_hook(lambda mod, args, name=name: self._count(name))

    def _count(self, name: str) -> None:
        self.mlp_calls[name] += 1

    def __call__(self, opt, args, kwargs) -> None:  # an optimizer step pre-hook
        if type(opt) is torch.optim.AdamW:  # accelerate's wrapper steps the same AdamW: count it once
            self.grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None])


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_recomputes_the_llm_layers_with_the_same_losses_and_gradients(
        tiny_data, base_model_dir, tmp_path, monkeypatch, stage: int):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from vistune.train import loop, stages

    def train(name: str, checkpointing: bool) -> tuple[list[float], Observed]:
        seen = Observed()
        real = stages.set_train_mode

        def set_train_mode(model, cfg) -> None:  # the loop's own, then hooks to watch the model it trains
            real(model, cfg)
            seen.watch(model)

        monkeypatch.setattr(loop, "set_train_mode", set_train_mode)
        cfg = tiny_config(tiny_data, tmp_path / name, {"model": {"from": str(base_model_dir)}, "train.max_steps": 2,
                                                        "train.gradient_checkpointing": checkpointing}, stage=stage)
        handle = register_optimizer_step_pre_hook(seen)
        try:
            r = run(cfg)
        finally:
            handle.remove()
        return [json.loads(x)["loss"] for x in r.metrics_path.read_text().splitlines()], seen

    ref_losses, ref = train("ref", False)
    ck_losses, ck = train("ckpt", True)
    # 2 steps of 1 micro-batch: each layer's MLP runs once per step, and once more in the backward when
    # its layer is checkpointed, also under a frozen LLM (stage 1), whose backward reaches the projector.
    assert len(ref.mlp_calls) == 2 and set(ref.mlp_calls.values()) == {2}
    assert ck.mlp_calls.keys() == ref.mlp_calls.keys()
    assert set(ck.mlp_calls.values()) == {4}
    assert ck.layer_modes == [(True, True)] * 2
    if stage == 1:
        # the frozen LLM's attention, MLP and dropout stay in eval: checkpointing turns no dropout on
        assert ck.submodules_training == ref.submodules_training == set()
    assert ck_losses == pytest.approx(ref_losses, rel=1e-5)
    assert len(ck.grads) == len(ref.grads) == 2
    for step_ck, step_ref in zip(ck.grads, ref.grads):
        assert len(step_ck) == len(step_ref) > 0
        for a, b in zip(step_ck, step_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compile_swaps_sdpa_for_eager_attention_on_a_cpu_only(tiny_data, tmp_path):
    from vistune.train.stages import build_model, compile_decoder

    cfg = tiny_config(tiny_data, tmp_path / "unused")
    for device, replaced, attn in (("cpu", "sdpa", "eager"), ("cuda", None, "sdpa")):
        model, _ = build_model(cfg)
        lm = model.language_model
        assert lm.config._attn_implementation == "sdpa"
        # Module.compile is lazy: nothing runs on the device until the first forward.
        assert compile_decoder(model, torch.device(device)) == replaced
        assert lm.config._attn_implementation == attn
        # Regional: each decoder layer on its own, not the stack around them nor the head.
        assert all(layer._compiled_call_impl is not None for layer in lm.model.layers)
        assert lm.model._compiled_call_impl is None and lm.lm_head._compiled_call_impl is None


def test_compile_is_regional_one_graph_for_every_layer(tiny_data, tmp_path):
    """Four like layers compile once: the compile does not grow with the LM's depth."""
    from torch._dynamo.utils import counters
    from transformers import GPT2Config, GPT2Model
    from vistune.model.tiny import tiny_text_config
    from vistune.train.stages import build_model, compile_decoder, repeated_layers

    cfg = tiny_config(tiny_data, tmp_path, {"model.llm": tiny_text_config("llama", vocab_size=512, layers=4)})
    model, _ = build_model(cfg)
    compile_decoder(model, torch.device("cpu"))
    decoder = model.language_model.model
    embeds = torch.randn(2, 7, decoder.config.hidden_size)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        got = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
    assert counters["stats"]["unique_graphs"] == graphs + 1
    for layer in decoder.layers:
        layer._compiled_call_impl = None  # the same layers, uncompiled
    with torch.no_grad():
        torch.testing.assert_close(got, decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state)

    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    assert repeated_layers(gpt2) is gpt2.h
    assert repeated_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None  # compiled whole


def test_compile_trains_the_same_model_through_a_compiled_decoder(tiny_data, base_model_dir, tmp_path):
    from torch._dynamo.utils import counters

    def train(name: str, compiled: bool):
        cfg = tiny_config(tiny_data, tmp_path / name, {"model": {"from": str(base_model_dir)}, "train.max_steps": 3,
                                                        "train.compile": compiled})
        r = run(cfg)
        return [json.loads(x)["loss"] for x in r.metrics_path.read_text().splitlines()], r.model_dir

    ref_losses, ref_dir = train("eager", False)
    graphs = counters["stats"]["unique_graphs"]
    losses, model_dir = train("compiled", True)
    assert counters["stats"]["unique_graphs"] > graphs  # the decoder did go through dynamo
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    ref, compiled = load_model(ref_dir)[0].state_dict(), load_model(model_dir)[0].state_dict()
    assert compiled.keys() == ref.keys()  # saved as an uncompiled model: no _orig_mod. prefixes
    # The compiled kernels sum in another order, and Adam turns that into up to 2 x lr per step
    # where a gradient is tiny (tests/tolerances.py): 3 steps at the fixture's lr of 1e-3.
    assert_trained_alike(compiled, ref, lr=1e-3, steps=3)
