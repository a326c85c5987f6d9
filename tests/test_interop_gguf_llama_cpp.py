"""GGUF export proven by llama.cpp itself: the exported pair, loaded by llama.cpp's own libraries
(libllama and the multimodal library mtmd, through llama-cpp-python's bindings), renders and
tokenizes the prompt as vistune does, computes the same image embeddings and answers with the
same greedy tokens as vistune's engine. Skipped when llama-cpp-python is not installed (the test
extra installs it; its install builds llama.cpp from source)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make install-test` installs it)")

from conftest import make_model, noise_image  # noqa: E402
from llama_cpp_runner import Pair  # noqa: E402
from real_weights import FOLLOW_UP, REFERENCE_QUESTIONS, smollm2_dir  # noqa: E402,F401
from train_fixtures import tiny_config, tiny_data  # noqa: E402,F401
from vistune.infer.engine import Engine, GenerationConfig, Prompt  # noqa: E402
from vistune.interop import export_checkpoint  # noqa: E402
from vistune.interop.gguf import export_gguf  # noqa: E402
from vistune.model.build import build_vlm  # noqa: E402
from vistune.model.checkpoint import LoadedModel, load  # noqa: E402
from vistune.model.tiny import tiny_vision_config  # noqa: E402
from vistune.train import run  # noqa: E402

MAX_NEW = 12


def vistune_tokens(engine: Engine, prompts: list[Prompt], max_new: int = MAX_NEW) -> tuple[list[list[int]], list]:
    run_ = engine.start(prompts, GenerationConfig(max_new_tokens=max_new))
    for _ in run_:
        pass
    return [row.tokens for row in run_.rows], run_.completions


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- a model trained by the tiny recipe, with a SigLIP tower ------------------------------------------
@pytest.fixture(scope="module")
def trained_vit(tiny_data, tmp_path_factory):  # noqa: F811
    """Stage 2 of the tiny preset's model (2-layer ViT, 2-layer Llama, mlp2x_gelu, v0 template), trained
    from scratch on the tiny data set until it answers about the shapes. Its ViT is SigLIP's (no CLS
    token): llama.cpp mis-orders a CLIP tower's CLS token (see the CLIP test below)."""
    out = tmp_path_factory.mktemp("gguf_trained")
    r = run(tiny_config(tiny_data, out / "run", {"model.vision": tiny_vision_config("siglip"), "train.epochs": 12,
                                                 "train.lr": 2e-3}))
    return r.model_dir


@pytest.fixture(scope="module")
def questions(tiny_data):  # noqa: F811
    """Eight image questions of the tiny data set, on its images (32 px squares: the tower's size)."""
    import json

    rows = [json.loads(line) for line in open(tiny_data["instruct"])]
    rows = [r for r in rows if "image" in r][:8]
    return [Prompt.ask(r["conversations"][0]["value"].replace("<image>\n", ""),
                       [Image.open(tiny_data["images"] / r["image"]).convert("RGB")]) for r in rows]


@pytest.fixture(scope="module")
def vit_engine(trained_vit):
    return Engine(load(trained_vit))


@pytest.fixture(scope="module")
def vit_answers(vit_engine, questions):
    tokens, completions = vistune_tokens(vit_engine, questions)
    return tokens, completions


@pytest.fixture(scope="module")
def exported(trained_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_files")
    return {t: export_checkpoint(trained_vit, out / t, format="gguf", outtype=t) for t in ("f32", "f16", "q8_0")}


def test_f32_same_prompt_ids_embeddings_and_greedy_tokens_as_vistune(vit_engine, questions, vit_answers,
                                                                     exported):
    pair = Pair(vit_engine, exported["f32"])
    try:
        tokens, completions = vit_answers
        assert sum("The" in c.text or "It" in c.text for c in completions) >= 4  # the model learned to answer
        for q, want in zip(questions, tokens):
            assert pair.prompt_ids(q) == vit_engine.encode(q).input_ids
            mine = vit_engine.image_embeds(q.images)[0].float().numpy()
            theirs = pair.lc.image_embeddings(q.images[0])
            assert theirs.shape == mine.shape
            assert cosines(mine, theirs).min() >= 0.999
            assert pair.greedy(q, len(want)) == want
        other = pair.lc.image_embeddings(noise_image(3))
        assert cosines(other, pair.lc.image_embeddings(questions[0].images[0])).min() < 0.99  # images matter
        # the next-token logits, not only their argmax, agree, far closer than two images' logits are
        q = questions[0]
        ids = torch.tensor([vit_engine.encode(q).input_ids])
        mine, theirs = [], []
        for image in (q.images[0], noise_image(3)):
            with torch.no_grad():
                mine.append(vit_engine.model(ids, pixel_values=vit_engine.loaded.pixels(image)[None]).logits[0, -1])
            theirs.append(pair.lc.next_logits(pair.text(q), [image]))
        off = max(np.abs(t - m.numpy()).max() for t, m in zip(theirs, mine))
        assert off < 1e-2 and np.abs(mine[1] - mine[0]).max().item() > 10 * off
    finally:
        pair.close()


def two_turn(engine: Engine, q: Prompt) -> Prompt:
    """``q``, vistune's answer, and a second question; a short system text keeps it in the tiny context."""
    q = Prompt(q.turns, q.images, system="Answer about the image.")
    _, (done,) = vistune_tokens(engine, [q])
    return Prompt([*q.turns, {"from": "gpt", "value": done.text}, {"from": "human", "value": "What shape is it?"}],
                  q.images, q.system)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_same_greedy_tokens_over_eight_questions_and_a_two_turn_conversation(vit_engine, questions, vit_answers,
                                                                             exported, outtype):
    pair = Pair(vit_engine, exported[outtype])
    try:
        tokens, _ = vit_answers
        got = [pair.greedy(q, len(want)) for q, want in zip(questions, tokens)]
        assert got == tokens
        conv = two_turn(vit_engine, questions[0])
        (want,), _ = vistune_tokens(vit_engine, [conv])
        assert pair.prompt_ids(conv) == vit_engine.encode(conv).input_ids
        assert pair.greedy(conv, len(want)) == want
    finally:
        pair.close()


def test_q8_0_agrees_on_at_least_seven_of_eight(vit_engine, questions, vit_answers, exported):
    pair = Pair(vit_engine, exported["q8_0"])
    try:
        tokens, _ = vit_answers
        same = sum(pair.greedy(q, len(want)) == want for q, want in zip(questions, tokens))
        assert same >= 7, f"q8_0 agreed on {same} of 8"
    finally:
        pair.close()


# -- SigLIP tower, Qwen2, linear projector, ChatML --------------------------------------------------
def test_siglip_qwen2_linear_projector_chatml(tokenizer, tmp_path):
    """The other covered parts: a SigLIP tower (no CLS token), a linear projector (written as its
    GELU-exact two-layer form), a Qwen2 LLM (biases, no RoPE reordering) and the ChatML template."""
    model, tok = make_model(tokenizer, vision="siglip", text="qwen2", projector="linear", template="chatml", seed=3)
    engine = Engine(LoadedModel(model, tok))
    files = export_gguf(model, tok, tmp_path / "gguf", outtype="f32")
    pair = Pair(engine, files)
    try:
        qs = [Prompt.ask(f"what color is the {s}", [noise_image(i)]) for i, s in enumerate(("circle", "square"))]
        tokens, _ = vistune_tokens(engine, qs, 8)
        for q, want in zip(qs, tokens):
            assert pair.prompt_ids(q) == engine.encode(q).input_ids
            mine = engine.image_embeds(q.images)[0].float().numpy()
            assert cosines(mine, pair.lc.image_embeddings(q.images[0])).min() >= 0.999
            assert pair.greedy(q, len(want)) == want
    finally:
        pair.close()


# -- a LoRA run exports merged ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def siglip_base_dir(tiny_data, tmp_path_factory):  # noqa: F811
    """A saved from-scratch tiny model with a SigLIP tower (for model.from)."""
    from accelerate.utils import set_seed

    from vistune.model.checkpoint import save_model
    from vistune.train.stages import build_model

    set_seed(0)
    cfg = tiny_config(tiny_data, tmp_path_factory.mktemp("unused"), {"model.vision": tiny_vision_config("siglip")})
    model, tok = build_model(cfg)
    return save_model(model, tok, tmp_path_factory.mktemp("siglip_base") / "model")


def test_lora_run_directory_exports_merged(tiny_data, siglip_base_dir, tmp_path, questions):  # noqa: F811
    base_model_dir = siglip_base_dir
    r = run(tiny_config(tiny_data, tmp_path / "run", {"model": {"from": str(base_model_dir)}, "train.llm": "lora",
                                                     "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
                                                     "train.lr": 1e-2, "train.max_steps": 3}))
    files = export_checkpoint(r.output_dir, tmp_path / "gguf", format="gguf", outtype="f32")
    merged = Engine(load(r.model_dir))
    base = Engine(load(base_model_dir))
    pair = Pair(merged, files)
    try:
        tokens, _ = vistune_tokens(merged, questions[:3], 8)
        base_tokens, _ = vistune_tokens(base, questions[:3], 8)
        assert tokens != base_tokens  # the adapters changed the answers...
        assert [pair.greedy(q, len(t)) for q, t in zip(questions[:3], tokens)] == tokens  # ...and are in the file
    finally:
        pair.close()


# -- real weights: SmolLM2-135M-Instruct --------------------------------------------------------------
def test_smollm2_text_only_same_greedy_tokens(smollm2_dir, tmp_path):  # noqa: F811
    """SmolLM2 behind a tiny CLIP tower, exported at f32: llama.cpp answers the suite's questions
    (Paris, Jupiter, then Berlin in a second turn) with vistune's greedy tokens."""
    torch.manual_seed(0)
    model, tok = build_vlm(tiny_vision_config("clip"), smollm2_dir, template="chatml")
    engine = Engine(LoadedModel(model.eval(), tok))
    files = export_gguf(model, tok, tmp_path / "gguf", outtype="f32")
    pair = Pair(engine, files)
    try:
        (q1, sys1, n1), (q2, sys2, n2) = REFERENCE_QUESTIONS[:2]
        prompts = [Prompt.ask(q1, system=sys1), Prompt.ask(q2, system=sys2)]
        tokens, completions = vistune_tokens(engine, prompts, 16)
        follow = Prompt([*prompts[0].turns, {"from": "gpt", "value": completions[0].text},
                         {"from": "human", "value": FOLLOW_UP[0]}])
        (ftok,), (fdone,) = vistune_tokens(engine, [follow], FOLLOW_UP[1])
        assert "Paris" in completions[0].text and "Jupiter" in completions[1].text and "Berlin" in fdone.text
        for p, want in zip([*prompts, follow], [*tokens, ftok]):
            assert pair.lc.tokenize(pair.text(p)) == engine.encode(p).input_ids
            assert pair.greedy(p, len(want)) == want
    finally:
        pair.close()


# -- CLIP towers: llama.cpp's CLS-last bug, measured ----------------------------------------------------
@contextlib.contextmanager
def llama_cpp_cls_order(tower):
    """vistune's CLIP tower run with llama.cpp's token layout (tools/mtmd/models/llava.cpp, as of
    llama.cpp 0c1e570: ggml-org/llama.cpp#25814): the CLS embedding after the patches, position
    embeddings 0..n given in that order (patch j gets j's, CLS gets n's), so that the select of rows
    1..n keeps patches 1..n-1 and the CLS row. Built from the embeddings' own output, so it holds
    whatever the weights."""

    def reorder(module, args, out):
        pos = module.position_embedding.weight[: out.shape[1]]
        cls, patches = out[:, :1] - pos[0], out[:, 1:] - pos[1:]
        return torch.cat([patches, cls], dim=1) + pos

    handle = tower.embeddings.register_forward_hook(reorder)
    try:
        yield
    finally:
        handle.remove()


def test_clip_tower_runs_exactly_as_llama_cpps_cls_last_graph_does(tokenizer, tmp_path):
    """A CLIP tower's file is right, and llama.cpp runs it with the CLS token last (its bug, not the
    export's): its image embeddings differ from vistune's, but equal (cosine >= 0.999 at f32) those
    of vistune's tower run in llama.cpp's layout (above), and its greedy tokens and logits equal
    vistune's given those embeddings. So everything else in the file (weights, quick GELU, pre-LayerNorm,
    feature layer, mean and std) is exact. The day llama.cpp puts CLS first again, the first
    assertion fails: then the export's note goes and CLIP joins the exact tests above."""
    model, tok = make_model(tokenizer, vision="clip", seed=5)
    engine = Engine(LoadedModel(model, tok), image_cache_size=0)
    files = export_gguf(model, tok, tmp_path / "gguf", outtype="f32")
    assert any("CLS token" in n for n in files.notes)
    pair = Pair(engine, files)
    try:
        qs = [Prompt.ask(f"what color is the {s}", [noise_image(i)]) for i, s in enumerate(("circle", "square"))]
        for q in qs:
            assert pair.prompt_ids(q) == engine.encode(q).input_ids
            mine = engine.image_embeds(q.images)[0].float().numpy()
            theirs = pair.lc.image_embeddings(q.images[0])
            assert cosines(mine, theirs).mean() < 0.9  # llama.cpp's bug: patch 0 lost, CLS kept
            with llama_cpp_cls_order(model.vision.model):
                emulated = engine.image_embeds(q.images)[0].float().numpy()
            assert cosines(emulated, theirs).min() >= 0.999
            # closer still: llama.cpp's CPU GELUs look their results up in a float16 table, so each
            # activation is rounded to half precision (u = eps/2); a few such roundings at most. (A
            # quick GELU written as GELU, off by far less than the cosine above can see, fails this.)
            rel = np.linalg.norm(theirs - emulated) / np.linalg.norm(emulated)
            assert rel <= 4 * torch.finfo(torch.float16).eps / 2, rel
        with llama_cpp_cls_order(model.vision.model):
            tokens, _ = vistune_tokens(engine, qs, 8)
        assert [pair.greedy(q, len(want)) for q, want in zip(qs, tokens)] == tokens
        # the logits, not only their argmax: llama.cpp's are the emulation's, far closer than vistune's are
        q = qs[0]
        ids = torch.tensor([engine.encode(q).input_ids])
        pixels = engine.loaded.pixels(q.images[0])[None]
        with torch.no_grad():
            base = model(ids, pixel_values=pixels).logits[0, -1].numpy()
            with llama_cpp_cls_order(model.vision.model):
                emulated = model(ids, pixel_values=pixels).logits[0, -1].numpy()
        theirs = pair.lc.next_logits(pair.text(q), list(q.images))
        off = np.abs(theirs - emulated).max()
        assert off < 1e-2 and np.abs(base - emulated).max() > 10 * off
    finally:
        pair.close()
