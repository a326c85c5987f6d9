"""Safe weight reading, shard handling and format detection."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_model
from interop_helpers import Evil, poison, save_tower, write_original_llava
from vistune.interop import InteropError, UnsafeCheckpointError, detect_format, load_foreign, read_weights
from vistune.interop.detect import resolve_format
from vistune.interop.weights import read_checkpoint, write_weights


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.weight": Evil(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match="mm_projector.bin: refused"):
        read_weights(bad)
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the control: a plain unpickler runs the payload
    assert marker.read_text() == "pwned"


def test_plain_tensor_bin_and_safetensors_read(tmp_path):
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "w.bin")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("w.bin", "w.safetensors"):
        got = read_weights(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(InteropError, match="list.bin: expected a flat mapping"):
        read_weights(tmp_path / "list.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InteropError, match="broken.safetensors: not a readable safetensors"):
        read_weights(tmp_path / "broken.safetensors")


def test_sharded_write_and_read_back(tmp_path):
    sd = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(6)}
    sd["tied"] = sd["layer.0.weight"]  # aliases are written as copies, not refused
    files = write_weights(sd, tmp_path, max_shard_size="40KB")
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    back = read_checkpoint(tmp_path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / index["weight_map"]["layer.3.weight"]).unlink()
    with pytest.raises(InteropError, match="lists shards that are missing"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("victim", ["pytorch_model-00001-of-00002.bin", "mm_projector.bin",
                                    "non_lora_trainables.bin"])
def test_every_bin_of_an_import_goes_through_the_safe_reader(tokenizer, tmp_path, victim):
    ref, tok = make_model(tokenizer)
    tower = save_tower(ref, tmp_path / "clip")
    marker = tmp_path / "pwned"
    if victim.startswith("pytorch_model"):
        src = write_original_llava(ref, tok, tmp_path / "llava")
        kw = {}
    else:
        base = tmp_path / "base"
        ref.language_model.save_pretrained(str(base))
        tok.save_pretrained(str(base))
        src = tmp_path / "ckpt"
        src.mkdir()
        kw = {"base": base}
        if victim == "non_lora_trainables.bin":
            from peft import LoraConfig, get_peft_model

            get_peft_model(ref.language_model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(src))
    poison(src / victim, marker)
    with pytest.raises(UnsafeCheckpointError, match=f"{victim}: refused"):
        load_foreign(src, vision_tower=tower, **kw)
    assert not marker.exists()


def test_detect_formats(tokenizer, tmp_path):
    ref, tok = make_model(tokenizer)
    full = write_original_llava(ref, tok, tmp_path / "full")
    assert detect_format(full) == "llava"
    # Released v1.5 checkpoints say model_type "llava" too; the mm_* keys tell them apart from llava-hf.
    cfg = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    assert detect_format(full) == "llava"
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps(cfg))
    torch.save({}, stage1 / "mm_projector.bin")
    assert detect_format(stage1) == "llava-projector"
    assert detect_format(stage1 / "mm_projector.bin") == "llava-projector"
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert detect_format(tmp_path / "lora") == "llava-lora"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                                                "text_config": {}, "vision_config": {}}))
    assert detect_format(hf) == "llava-hf"
    assert resolve_format(hf, "llava-hf") == "llava-hf"
    with pytest.raises(InteropError, match="--from llava given, but this looks like a llava-hf"):
        resolve_format(hf, "llava")
    from vistune.model.checkpoint import save_model

    vt = save_model(ref, tok, tmp_path / "vt")
    assert detect_format(vt) == "vistune"
    with pytest.raises(InteropError, match="already a vistune model"):
        load_foreign(vt)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InteropError, match="model_type 'bert'.*neither"):
        detect_format(tmp_path / "bert")
    with pytest.raises(InteropError, match="no such file"):
        detect_format(tmp_path / "missing")
