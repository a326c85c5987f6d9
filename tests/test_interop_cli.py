"""`vistune import` / `vistune export` end to end through the command line."""
import json

import torch
from transformers import LlavaForConditionalGeneration

import vistune
from conftest import make_model, noise_image
from interop_helpers import pixels_for, poison, prompt, save_tower, vistune_logits, write_original_llava
from vistune.cli import main
from vistune.model.checkpoint import save_model
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered


def test_import_original_then_export_llava_hf(tokenizer, tmp_path, capsys):
    ref, tok = make_model(tokenizer)
    src = write_original_llava(ref, tok, tmp_path / "llava-v1.5-tiny")
    tower = save_tower(ref, tmp_path / "clip")
    rc = main(["import", str(src), "--out", str(tmp_path / "vt"), "--from", "llava", "--vision-tower", str(tower),
               "--template", "llava_v1"])
    out = capsys.readouterr().out
    assert rc == 0 and "imported llava (full)" in out and "template llava_v1" in out and "16 image tokens" in out
    loaded = vistune.load(tmp_path / "vt")
    assert loaded.template.name == "llava_v1"

    rc = main(["export", str(tmp_path / "vt"), "--format", "llava-hf", "--out", str(tmp_path / "hf")])
    assert rc == 0 and "vllm serve" in capsys.readouterr().out
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    ids, pix = prompt(ref, tok, template="llava_v1"), pixels_for(ref, noise_image(8))
    with torch.no_grad():
        # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
        assert_reordered(hf(input_ids=ids, pixel_values=pix).logits, vistune_logits(ref, ids, pix),
                         TINY_TERMS, TINY_FORWARD)
    assert json.loads((tmp_path / "hf" / "vistune.json").read_text())["template"] == "llava_v1"


def test_cli_errors_name_the_problem(tokenizer, tmp_path, capsys):
    model, tok = make_model(tokenizer, projector="linear")
    save_model(model, tok, tmp_path / "vt")
    rc = main(["export", str(tmp_path / "vt"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 1 and "'linear'" in err and "mlp2x_gelu" in err and "vistune format" in err
    assert not (tmp_path / "hf").exists()

    src = write_original_llava(model, tok, tmp_path / "llava")
    rc = main(["import", str(src), "--out", str(tmp_path / "x")])
    assert rc == 1 and "--vision-tower" in capsys.readouterr().err

    marker = tmp_path / "pwned"
    poison(src / "pytorch_model-00002-of-00002.bin", marker)
    rc = main(["import", str(src), "--out", str(tmp_path / "x"), "--vision-tower", str(save_tower(model, tmp_path / "c"))])
    assert rc == 1 and "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "x").exists()
