import importlib.util
import json
import shutil

import pytest
import torch
from PIL import Image

import vistune

from train_fixtures import base_model_dir, subset, tiny_config, tiny_data  # noqa: F401
from vistune.data.collate import PadCollator
from vistune.data.dataset import VLDataset, text_settings_for
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.model.checkpoint import load_adapter_model, load_model
from vistune.train import ConfigError, run
from vistune.model.adapters import is_adapter_dir
from vistune.train.lora import merge_lora, save_adapter_run
from vistune.train.stages import apply_modes, build_model
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered, trained_losses


def lora_config(tiny_data, base_model_dir, out, extra=None):
    return tiny_config(tiny_data, out, {"model": {"from": str(base_model_dir)}, "train.llm": "lora",
                                        "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0, "train.lr": 1e-2,
                                        "train.projector_lr": 1e-3, **(extra or {})})


def test_lora_marks_only_adapters_and_projector_trainable(tiny_data, base_model_dir, tmp_path):
    cfg = lora_config(tiny_data, base_model_dir, tmp_path)
    model, _ = build_model(cfg)
    apply_modes(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    llm = [n for n in trainable if n.startswith("language_model.")]
    assert llm and all("lora_A" in n or "lora_B" in n for n in llm)
    assert not any("lm_head" in n or "embed_tokens" in n for n in llm)  # all-linear spares lm_head
    # every Linear of the decoder got an adapter: q k v o gate up down, for each of 2 layers
    assert len([n for n in llm if "lora_A" in n]) == 2 * 7
    assert {n.split(".")[0] for n in trainable} == {"language_model", "projector"}
    cfg_qv = lora_config(tiny_data, base_model_dir, tmp_path, {"lora.target_modules": "q_proj,v_proj"})
    model, _ = build_model(cfg_qv)
    apply_modes(model, cfg_qv)
    assert len([n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]) == 2 * 2


def test_lora_run_saves_adapters_and_merge_equals_adapter_logits(tiny_data, base_model_dir, tmp_path):
    r = run(lora_config(tiny_data, base_model_dir, tmp_path / "run", {"train.max_steps": 3}))
    assert is_adapter_dir(r.model_dir)
    assert (r.model_dir / "llm_adapter" / "adapter_config.json").exists()
    assert (r.model_dir / "non_lora_trainables.safetensors").exists()

    adapted, tok = load_adapter_model(r.output_dir)
    base, _ = load_model(base_model_dir)
    base_state = base.state_dict()
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it learned
    frozen_same = 0
    for n, p in adapted.language_model.get_base_model().named_parameters():
        if "lora_" in n:
            continue
        key = "language_model." + n.replace(".base_layer", "")
        assert torch.equal(p, base_state[key]), key
        frozen_same += 1
    assert frozen_same == len([k for k in base_state if k.startswith("language_model.")])
    assert any(not torch.equal(v, base_state[f"projector.{k}"]) for k, v in adapted.projector.state_dict().items())

    merged_dir = merge_lora(r.output_dir, tmp_path / "merged")
    merged, _ = load_model(merged_dir)
    assert not is_adapter_dir(merged_dir)
    ds = VLDataset(tiny_data["instruct"], text_settings_for(merged.config, tok), tiny_data["images"],
                   merged.config.image)
    batch = PadCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    with torch.no_grad():
        a = adapted(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        b = merged(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        c = base(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    mask = batch["attention_mask"].bool()
    # W + BA folded once against Wx + B(Ax): the same products, summed in another order.
    assert_reordered(b[mask], a[mask], TINY_TERMS, TINY_FORWARD)
    assert (c[mask] - a[mask]).abs().max() > 1e-2  # the adapters do change the model

    # Every tool loads the run itself as it is: vistune.load folds the adapters in.
    loaded = vistune.load(r.model_dir)
    assert not hasattr(loaded.model.language_model, "peft_config")
    with torch.no_grad():
        d = loaded.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert_reordered(d[mask], a[mask], TINY_TERMS, TINY_FORWARD)  # folded on load: as above
    (answer,) = Engine(loaded).generate([Prompt.ask("What is this?", [Image.new("RGB", (32, 32), "red")])],
                                        GenerationConfig(max_new_tokens=3))
    assert answer.completion_tokens >= 1


def test_merge_lora_refuses_plain_runs(tiny_data, base_model_dir, tmp_path):
    with pytest.raises(ValueError, match="plain model directory"):
        merge_lora(base_model_dir, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no LoRA run"):
        merge_lora(tmp_path, tmp_path / "x")


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_data, base_model_dir, tmp_path, monkeypatch):
    from vistune.train import lora

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(lora.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    cfg = lora_config(tiny_data, base_model_dir, tmp_path, {"lora.bits": 4})
    model, _ = build_model(cfg)
    with pytest.raises(ConfigError, match=r"lora.bits=4 \(QLoRA\) needs bitsandbytes.*pip install bitsandbytes"):
        apply_modes(model, cfg)


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="QLoRA needs bitsandbytes (the test extra installs it)")


def _four_record_run(tiny_data, base_model_dir, out, bits, monkeypatch, batch):
    """LoRA (bits 16) or QLoRA on four records for 20 steps; returns the run, the model it trained,
    its logits on ``batch`` before the first step (adapters still zero) and its quantized weights then."""
    from vistune.train import loop, stages

    seen = {}

    def set_train_mode(model, cfg) -> None:  # the loop's own, called once before the first step
        stages.set_train_mode(model, cfg)
        with torch.no_grad():
            seen["logits"] = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        seen["model"] = model
        seen["quantized"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype in (torch.uint8,
                                                                                                       torch.int8)}

    monkeypatch.setattr(loop, "set_train_mode", set_train_mode)
    out.parent.mkdir(parents=True, exist_ok=True)
    four = subset(tiny_data["instruct"], out.parent / "four.jsonl", 4, keep=lambda r: "image" in r)
    r = run(lora_config(tiny_data, base_model_dir, out, {"lora.bits": bits, "data.train": str(four), "train.epochs": 20,
                                                         "train.scheduler": "constant"}))
    return r, seen


@needs_bitsandbytes
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_quantizes_the_frozen_llm_learns_like_lora_and_its_adapters_work_on_the_full_base(
        tiny_data, base_model_dir, tmp_path, monkeypatch, bits):
    import bitsandbytes as bnb

    base, tok = load_model(base_model_dir)
    ds = VLDataset(tiny_data["instruct"], text_settings_for(base.config, tok), tiny_data["images"], base.config.image)
    batch = PadCollator(tok.pad_token_id)([ds[i] for i in range(4)])

    def loss_and_logits(m) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            out = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
            full = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        return out.loss.item(), full

    lora, _ = _four_record_run(tiny_data, base_model_dir, tmp_path / "lora" / "run", 16, monkeypatch, batch)
    r, seen = _four_record_run(tiny_data, base_model_dir, tmp_path / "qlora" / "run", bits, monkeypatch, batch)
    model = seen["model"]

    # Every linear layer of the decoder is quantized (2 layers x q k v o gate up down); the head is not.
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    lm = model.language_model.get_base_model()
    quantized = [m for m in lm.modules() if isinstance(m, layer_type)]
    assert len(quantized) == 2 * 7
    assert type(lm.lm_head) is torch.nn.Linear and lm.lm_head.weight.dtype == torch.float32
    for m in quantized:
        stored = m.weight.numel() * m.weight.element_size()
        assert stored == m.in_features * m.out_features * bits // 8  # two weights a byte at 4 bits
    assert len(seen["quantized"]) == 2 * 7
    # Only the adapters and the projector learn; the quantized weights are the same bits after training.
    learnable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in learnable} == {"language_model", "projector"}
    assert all("lora_A" in n or "lora_B" in n for n in learnable if n.startswith("language_model."))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in seen["quantized"].items())

    # Before the first step (B = 0) the model is the quantized base: near the full one, not equal to it.
    base_loss, base_logits = loss_and_logits(base)
    error = (seen["logits"] - base_logits).abs().max().item()
    assert 0 < error < 0.2 * (base_logits.max() - base_logits.min()).item(), error
    # It learns as plain LoRA does.
    assert lora.first_loss - lora.final_loss > 0.5
    assert r.first_loss - r.final_loss > 0.8 * (lora.first_loss - lora.final_loss), (r.final_loss, lora.final_loss)
    # The adapters, loaded onto the full-precision base (as chat, serve and merge-lora do), keep what was learnt.
    qlora_loss, _ = loss_and_logits(model)
    loaded_loss, _ = loss_and_logits(vistune.load(r.model_dir).model)
    assert base_loss - loaded_loss > 0.8 * (base_loss - qlora_loss), (base_loss, qlora_loss, loaded_loss)


@needs_bitsandbytes
def test_a_qlora_run_resumes_from_its_checkpoint_exactly(tiny_data, base_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = lora_config(tiny_data, base_model_dir, run_dir, {"lora.bits": 4, "train.max_steps": 4,
                                                           "train.save_every": 2, "train.keep_last": 2})
    run(cfg)
    straight = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # As if the process died after step 2: the base is quantized again, the adapters come back.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    shutil.rmtree(run_dir / "model")
    r = run(cfg, resume="auto")
    assert r.resumed_from is not None and r.resumed_from.name == "step-00000002"
    resumed = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed[:2] == straight[:2]
    assert resumed[2:] == pytest.approx(straight[2:], rel=1e-5)
    assert is_adapter_dir(run_dir / "model")


def test_lora_run_with_its_own_base_survives_a_move(tiny_data, base_model_dir, tmp_path):
    cfg = lora_config(tiny_data, base_model_dir, tmp_path)
    model, tok = build_model(cfg)
    apply_modes(model, cfg)
    run_dir = tmp_path / "run"
    shutil.copytree(base_model_dir, run_dir / "base")  # as a run without model.from writes it
    save_adapter_run(model, tok, run_dir / "model", run_dir / "base", {"llm": "lora"})
    assert json.loads((run_dir / "model" / "config.json").read_text())["adapter"]["base"] == "../base"
    elsewhere = save_adapter_run(model, tok, tmp_path / "other" / "model", base_model_dir, {"llm": "lora"})
    assert json.loads((elsewhere / "config.json").read_text())["adapter"]["base"] == str(base_model_dir.resolve())

    shutil.move(run_dir, tmp_path / "moved")
    loaded = vistune.load(tmp_path / "moved" / "model")
    ids = torch.tensor([[tok.bos_token_id or 1, 5, 6, 7]])
    with torch.no_grad():
        expected = model(ids).logits
        assert_reordered(loaded.model(ids).logits, expected, TINY_TERMS, TINY_FORWARD)  # folded on load


def test_vision_lora_run_trains_only_tower_adapters_and_projector_and_loads_with_the_same_logits(
        tiny_data, base_model_dir, tmp_path, monkeypatch):
    from vistune.train import loop, stages

    trained = []

    def set_train_mode(model, cfg) -> None:  # the loop's own; keeps the model it trains, to compare with
        stages.set_train_mode(model, cfg)
        trained.append(model)

    monkeypatch.setattr(loop, "set_train_mode", set_train_mode)
    cfg = lora_config(tiny_data, base_model_dir, tmp_path / "run", {"train.vision": "lora", "train.llm": "frozen",
                                                                    "train.max_steps": 3})
    r = run(cfg)
    (model,) = trained
    learnable = [n for n, p in model.named_parameters() if p.requires_grad]
    tower = [n for n in learnable if n.startswith("vision.")]
    assert tower and all("lora_A" in n or "lora_B" in n for n in tower)
    assert {n.split(".")[0] for n in learnable} == {"vision", "projector"}  # the LLM is frozen, as configured

    assert is_adapter_dir(r.model_dir)
    assert (r.model_dir / "vision_adapter" / "adapter_config.json").exists()
    assert not (r.model_dir / "llm_adapter").exists()
    assert json.loads((r.model_dir / "config.json").read_text())["adapter"]["modules"] == {
        "vision": "lora", "projector": "full", "llm": "frozen"}

    base, tok = load_model(base_model_dir)
    base_state = base.state_dict()
    adapted, _ = load_adapter_model(r.output_dir)
    # B starts at zero: some learned (the tower's last layer, past its feature layer, gets no gradient)
    assert any(p.abs().sum() > 0 for n, p in adapted.vision.model.named_parameters() if "lora_B" in n)
    for n, p in adapted.vision.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_state["vision.model." + n.replace(".base_layer", "")]), n
    for n, p in adapted.language_model.named_parameters():
        assert torch.equal(p, base_state["language_model." + n]), n

    ds = VLDataset(tiny_data["instruct"], text_settings_for(base.config, tok), tiny_data["images"], base.config.image)
    batch = PadCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    assert batch["pixel_values"] is not None and len(batch["pixel_values"]) > 0  # the tower has work to do
    mask = batch["attention_mask"].bool()

    def logits(m) -> torch.Tensor:
        with torch.no_grad():
            return m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits[mask]

    expected = logits(model)
    assert (logits(base) - expected).abs().max() > 1e-2  # the run changed the model
    loaded = vistune.load(r.model_dir)
    assert not hasattr(loaded.model.vision.model, "peft_config")  # folded in on load
    # Folded adapters (on load, merged) against adapted layers: the same products in another order.
    assert_reordered(logits(loaded.model), expected, TINY_TERMS, TINY_FORWARD)
    assert_reordered(logits(adapted), expected, TINY_TERMS, TINY_FORWARD)
    merged, _ = load_model(merge_lora(r.output_dir, tmp_path / "merged"))
    assert_reordered(logits(merged), expected, TINY_TERMS, TINY_FORWARD)


def test_a_compiled_lora_run_trains_as_an_uncompiled_one(tiny_data, base_model_dir, tmp_path):
    from torch._dynamo.utils import counters

    def losses(name: str, compiled: bool) -> list[float]:
        r = run(lora_config(tiny_data, base_model_dir, tmp_path / name, {"train.max_steps": 3, "train.compile": compiled}))
        return [json.loads(x)["loss"] for x in r.metrics_path.read_text().splitlines()]

    ref = losses("eager", False)
    graphs = counters["stats"]["unique_graphs"]
    got = losses("compiled", True)
    assert counters["stats"]["unique_graphs"] > graphs  # the adapted layers did go through dynamo
    assert got == pytest.approx(ref, **trained_losses(3))  # compiled kernels sum in another order
