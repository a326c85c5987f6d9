import json

import pytest
import torch

import vistune
from conftest import make_model, noise_image
from vistune.data.images import preprocess
from vistune.model.checkpoint import save_model
from vistune.text.encode import encode_conversation


@pytest.mark.parametrize("text", ["llama", "gpt2"])
def test_save_load_identical_logits(tokenizer, tmp_path, text):
    model, tok = make_model(tokenizer, "clip", text, template="v0")
    path = save_model(model, tok, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vistune_version"] == vistune.__version__ and cfg["template"] == "v0"
    assert cfg["vision"]["model_type"] == "clip_vision_model" and cfg["text"]["model_type"] == text
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert (path / "preprocessor_config.json").exists()

    loaded = vistune.load(path)
    enc = encode_conversation(tok, "v0", [{"from": "human", "value": "<image>\nWhat?"}],
                              image_token_id=model.image_token_id, num_image_tokens=model.config.num_image_tokens,
                              add_generation_prompt=True)
    ids = torch.tensor([enc.input_ids])
    pix = preprocess(noise_image(1), model.config.image)[None]
    with torch.no_grad():
        a = model(ids, pixel_values=pix).logits
        b = loaded.model(ids, pixel_values=loaded.pixels(noise_image(1))[None]).logits
    assert torch.equal(a, b)
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id
    assert loaded.template.name == "v0"
    for (k, p), (k2, p2) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(p, p2)


def test_load_keeps_the_saved_dtype_unless_asked(tokenizer, tmp_path):
    model, tok = make_model(tokenizer, "clip", "llama", template="v0")
    model.to(torch.bfloat16)
    path = save_model(model, tok, tmp_path / "bf16")
    loaded = vistune.load(path)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    for (k, p), (k2, p2) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(p, p2)
    as_fp32 = vistune.load(path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.model.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.model.projector[0].weight, model.projector[0].weight.float())


def test_save_is_atomic_and_replaces(tokenizer, tmp_path, monkeypatch):
    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()
    import vistune.model.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "st_save_model", boom)
    with torch.no_grad():
        next(model.projector.parameters()).add_(1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tok, path)
    # The good model is still there, untouched, and no temporary directory is left behind.
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vistune model directory"):
        vistune.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "mm_vision_tower": "x"}))
    with pytest.raises(ValueError, match="vistune import"):
        vistune.load(tmp_path)


def test_format_version_is_the_oldest_that_holds_the_model(tokenizer, tmp_path):
    """A model with anyres images or a connector says format 2, so an older vistune (which reads up to
    1 and drops fields it does not know) refuses it instead of building another model; others stay 1."""
    from vistune.model.checkpoint import load_model
    from vistune.model.config import FORMAT_VERSION, VLMConfig

    for kwargs, version in (({}, 1), ({"image_aspect": "anyres"}, 2)):
        model, tok = make_model(tokenizer, **kwargs)
        save_model(model, tok, tmp_path / str(version))
        saved = json.loads((tmp_path / str(version) / "config.json").read_text())
        assert saved["format_version"] == version
        assert load_model(tmp_path / str(version))[0].config.image.aspect == model.config.image.aspect
    cfg = make_model(tokenizer)[0].config.to_dict()
    assert VLMConfig.from_dict({**cfg, "connector": {"type": "resampler", "num_queries": 4}}).to_dict()[
        "format_version"] == 2
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}; this vistune reads up to "
                                         f"{FORMAT_VERSION} \\(upgrade vistune\\)"):
        VLMConfig.from_dict({**cfg, "format_version": FORMAT_VERSION + 1})
