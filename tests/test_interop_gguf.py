"""GGUF export (llama.cpp): what is refused, before anything is written, and the chat template
llama.cpp is given. That llama.cpp runs the files and answers as vistune does is proven in
test_interop_gguf_llama_cpp.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model
from vistune.data.images import ImageConfig
from vistune.interop import InteropError
from vistune.interop.chat_template import LLAMA_CPP_MARKER, jinja_chat_template
from vistune.interop.gguf import export_gguf
from vistune.interop.gguf_llm import bpe_pre_tokenizer
from vistune.interop.llava_hf import export_llava_hf
from vistune.model.build import build_vlm
from vistune.model.checkpoint import save_model
from vistune.model.tiny import tiny_text_config
from vistune.text.templates import render

pytest.importorskip("gguf", reason="GGUF export needs the `gguf` package (the test extra installs it)")

SRC = Path(__file__).resolve().parents[1] / "src"
RESNET = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1],
          "layer_type": "basic", "downsample_in_first_stage": False}


def resnet_model(tokenizer):
    torch.manual_seed(0)
    model, tok = build_vlm(RESNET, tiny_text_config("llama", vocab_size=len(tokenizer)), tokenizer,
                           vision_feature_layer=-1, image=ImageConfig(size=32))
    return model.eval(), tok


def assert_refused(model, tok, out, *fragments):
    with pytest.raises(InteropError) as e:
        export_gguf(model, tok, out)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    assert not out.exists()  # refused before anything was written
    return msg


def test_demo_resnet_tower_is_refused_by_name_by_both_exports(tokenizer, tmp_path):
    model, tok = resnet_model(tokenizer)
    assert_refused(model, tok, tmp_path / "gguf", "'resnet'", "ResNetModel", "CLIP and SigLIP")
    with pytest.raises(InteropError) as e:
        export_llava_hf(model, tok, tmp_path / "hf")
    assert "'resnet'" in str(e.value) and "ResNetModel" in str(e.value) and "CLIP, SigLIP" in str(e.value)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kwargs,fragments", [
    ({"text": "gpt2"}, ("'gpt2'", "Llama, Mistral and Qwen2")),
    ({"projector": "mlp3x_gelu"}, ("'mlp3x_gelu'", "mlp2x_gelu")),
    ({"vision_feature_select": "cls_patch"}, ("'cls_patch'", "'patch'")),
])
def test_parts_llama_cpp_cannot_run_are_refused_naming_part_and_support(tokenizer, tmp_path, kwargs, fragments):
    model, tok = make_model(tokenizer, **kwargs)
    assert_refused(model, tok, tmp_path / "out", *fragments)


def test_unknown_outtype_and_pre_tokenizer_are_refused(tokenizer, tmp_path):
    model, tok = make_model(tokenizer)
    with pytest.raises(InteropError, match="one of f32, f16, bf16, q8_0"):
        export_gguf(model, tok, tmp_path / "out", outtype="q4_0")
    assert not (tmp_path / "out").exists()
    tj = json.loads(tok.backend_tokenizer.to_str())
    assert bpe_pre_tokenizer(tj) == "gpt-2"
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    with pytest.raises(InteropError, match=r"pre-tokenizer \(Metaspace\) has no llama.cpp equivalent"):
        bpe_pre_tokenizer(tj)


def test_cli_exports_the_pair_and_names_both_files(tokenizer, tmp_path):
    model, tok = make_model(tokenizer)
    save_model(model, tok, tmp_path / "m")
    out = tmp_path / "gguf"
    r = subprocess.run([sys.executable, "-m", "vistune.cli", "export", str(tmp_path / "m"), "--format", "gguf",
                        "--out", str(out), "--outtype", "q8_0"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mmproj-q8_0.gguf", "model-q8_0.gguf"]
    assert "llama-server -m" in r.stdout and "--mmproj" in r.stdout

    import gguf

    llm = gguf.GGUFReader(out / "model-q8_0.gguf")
    assert llm.fields["general.architecture"].contents() == "llama"
    assert llm.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    types = {t.name: t.tensor_type.name for t in llm.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    mm = gguf.GGUFReader(out / "mmproj-q8_0.gguf")
    assert mm.fields["clip.projector_type"].contents() == "mlp"
    assert mm.fields["clip.vision.feature_layer"].contents() == [1]  # layer -2 of 2: one block runs
    assert not any(t.name.startswith("v.blk.1.") or t.name.startswith("v.post_ln") for t in mm.tensors)

    bad = subprocess.run([sys.executable, "-m", "vistune.cli", "export", str(tmp_path / "m"), "--format", "gguf",
                          "--out", str(tmp_path / "x"), "--outtype", "q4_0"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert bad.returncode != 0 and not (tmp_path / "x").exists()


def _jinja(source: str, messages: list[dict], tok) -> str:
    """Render as llama-cpp-python's Jinja2ChatFormatter does (sandboxed Jinja2, raise_exception)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(messages=messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                          add_generation_prompt=True, raise_exception=raise_exception)


@pytest.mark.parametrize("template", ["vicuna_v1", "v0", "chatml", "llava_v1", "plain"])
def test_llama_cpp_chat_template_renders_as_vistune_with_llama_cpps_image_markers(tokenizer, template):
    """llama-mtmd-cli and llama-cpp-python hand the template "<__media__>question" (string content,
    the marker glued to the text); llama-server a random "<__media_X__>" marker. Both render as
    vistune renders "<image>\\nquestion"; typed image parts too; no transformers-only tags."""
    src = jinja_chat_template(template, tokenizer, llama_cpp=True)
    assert "{%- generation" not in src and "endgeneration" not in src
    q = "what color is the circle"
    turns = [{"from": "human", "value": f"<image>\n{q}"}]
    if template != "plain":
        turns += [{"from": "gpt", "value": "red."}, {"from": "human", "value": "and the square?"}]
    want = render(template, turns, add_generation_prompt=True, eos=tokenizer.eos_token,
                  bos=tokenizer.bos_token).text

    def messages(first):
        out = [{"role": "user", "content": first}]
        if template != "plain":
            out += [{"role": "assistant", "content": "red."}, {"role": "user", "content": "and the square?"}]
        return out

    for marker in (LLAMA_CPP_MARKER, "<__media_a1b2c3__>"):
        # the BOS is written by the template (llama.cpp drops it when it adds one itself)
        expected = tokenizer.bos_token + want.replace("<image>", marker)
        assert _jinja(src, messages(marker + q), tokenizer) == expected
        assert _jinja(src, messages(marker + "\n" + q), tokenizer) == expected
        if marker == LLAMA_CPP_MARKER:
            typed = [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": q}]
            assert _jinja(src, messages(typed), tokenizer) == expected
