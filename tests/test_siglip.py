"""A SigLIP tower (no CLS token) as a first-class citizen: both stages, export to llava-hf, import back."""
from __future__ import annotations

import json

import torch
from conftest import noise_image
from interop_helpers import greedy, pixels_for, prompt, vistune_logits
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered
from train_fixtures import tiny_config, tiny_data  # noqa: F401
from transformers import LlavaForConditionalGeneration

from vistune.interop import export_checkpoint, import_checkpoint
from vistune.model.checkpoint import load_model
from vistune.model.tiny import tiny_vision_config
from vistune.train import run


def test_siglip_trains_both_stages_exports_and_imports(tiny_data, tmp_path):
    siglip = {"model.vision": tiny_vision_config("siglip"), "train.max_steps": 2}
    r1 = run(tiny_config(tiny_data, tmp_path / "s1", siglip, stage=1))
    assert r1.projector_path is not None and r1.projector_path.exists()
    r2 = run(tiny_config(tiny_data, tmp_path / "s2", {**siglip, "model.projector_from": str(r1.projector_path)}))
    rows = [json.loads(x) for x in r2.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)

    model, tok = load_model(r2.model_dir)
    assert model.config.vision["model_type"] == "siglip_vision_model"
    assert not model.vision.has_cls and model.config.num_image_tokens == 16  # every patch kept: no CLS to drop

    hf_dir = export_checkpoint(r2.model_dir, tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["vision_feature_select_strategy"] == "full"  # "default" would drop a patch as if it were CLS
    hf, info = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not any(info.values()), info
    ids, pix = prompt(model, tok), pixels_for(model, noise_image(3, (44, 30)))
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pix).logits
    # transformers' model and vistune's: the same modules, other masks and kernels' blocking.
    assert_reordered(vistune_logits(model, ids, pix), theirs, TINY_TERMS, TINY_FORWARD)

    back = import_checkpoint(hf_dir, tmp_path / "back").model
    assert back.config.vision["model_type"] == "siglip_vision_model"
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert greedy(lambda x: back(x, pixel_values=pix).logits, ids) == greedy(
        lambda x: model(x, pixel_values=pix).logits, ids)
