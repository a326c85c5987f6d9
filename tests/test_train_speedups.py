"""train/speedups.py: the training forward takes less work and gives the plain forward's loss and gradients."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from test_vlm import sample
from tolerances import TINY_BACKWARD, TINY_FORWARD, TINY_TERMS, assert_grads_reordered, assert_reordered
from vistune.data.collate import PadCollator
from vistune.model.build import build_vlm
from vistune.model.tiny import tiny_text_config, tiny_vision_config
from vistune.model.vlm import IGNORE_INDEX, causal_lm_loss
from vistune.train.speedups import for_training, right_padded


def _batch(model, tok, side="right"):
    return PadCollator(tok.pad_token_id, side=side)([sample(model, tok, "<image>\nWhat color is the circle?", 1),
                                                     sample(model, tok, "Q?", 0, reply="Yes.")])


def _decoder_masks(model) -> list:
    """The attention_mask each call of the LM's decoder gets."""
    seen = []
    model.language_model.get_decoder().register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    return seen


def test_it_shares_the_models_modules_and_parameters(tiny_model):
    model, _ = tiny_model
    fast = for_training(model)
    assert fast.vision is model.vision and fast.projector is model.projector
    assert fast.language_model is model.language_model and fast.config is model.config
    assert fast.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("text", ["llama", "qwen2", "gpt2"])
def test_the_training_loss_and_gradients_are_the_plain_forwards(tokenizer, text, impl):
    model, tok = make_model(tokenizer, text=text)
    model.language_model.set_attn_implementation(impl)
    model.eval()  # GPT-2's dropout would differ between the two passes; the gradients are the same maths
    b = _batch(model, tok)
    assert (b["attention_mask"] == 0).any()
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for m in (for_training(model), model):
        model.zero_grad()
        out = m(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
        out.loss.backward()
        results.append((out.loss.detach(), out.num_supervised, [None if p.grad is None else p.grad.clone() for p in params]))
    (fast, fast_n, g_fast), (plain, plain_n, g_plain) = results
    assert fast_n == plain_n == int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    # The head at the supervised rows only, and the causal kernel: the same sums in another blocking.
    assert_reordered(fast, plain, TINY_TERMS, TINY_FORWARD)
    assert sum(g is not None for g in g_fast) > 0
    assert_grads_reordered(g_fast, g_plain, TINY_TERMS, TINY_BACKWARD)


def test_the_head_runs_at_the_supervised_positions_only(tiny_model):
    model, tok = tiny_model
    b = _batch(model, tok)
    rows = []
    model.language_model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape))
    with torch.no_grad():
        out = for_training(model)(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
    assert out.logits is None
    assert rows == [torch.Size([out.num_supervised, model.language_model.config.hidden_size])]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_right_padded_batch_goes_without_its_mask_a_left_padded_one_keeps_it(tiny_model, impl):
    model, tok = tiny_model
    model.language_model.set_attn_implementation(impl)
    masks = _decoder_masks(model)
    fast = for_training(model)
    with torch.no_grad():
        for side in ("right", "left"):
            b = _batch(model, tok, side)
            fast(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
    assert masks[0] is None and masks[1] is not None
    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0]])) and right_padded(torch.ones(2, 3))
    assert not right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]])) and not right_padded(None)


def test_other_calls_take_the_plain_forward(tiny_model):
    model, tok = tiny_model
    b = _batch(model, tok)
    fast = for_training(model)
    with torch.no_grad():
        got = fast(b["input_ids"], b["attention_mask"], b["pixel_values"])
        want = model(b["input_ids"], b["attention_mask"], b["pixel_values"])
        assert torch.equal(got.logits, want.logits)
        # An LM that post-processes its logits (soft-capping) gets its own forward, logits and all.
        model.language_model.config.final_logit_softcapping = 30.0
        out = fast(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
    assert out.logits is not None and out.num_supervised > 0


def test_an_unsupervised_batch_has_no_loss(tiny_model):
    model, tok = tiny_model
    b = _batch(model, tok)
    with torch.no_grad():
        out = for_training(model)(b["input_ids"], b["attention_mask"], b["pixel_values"],
                                  labels=torch.full_like(b["labels"], IGNORE_INDEX))
    assert out.num_supervised == 0 and float(out.loss) == 0.0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_sliding_window_shorter_than_the_batch_is_kept_in_the_training_loss(tokenizer, impl):
    # Mistral-style attention sees only the last `sliding_window` tokens: the causal mask alone
    # would let the training loss see more than inference does.
    torch.manual_seed(0)
    text = {**tiny_text_config("llama", vocab_size=len(tokenizer)), "model_type": "mistral", "sliding_window": 6}
    model, tok = build_vlm(tiny_vision_config("clip"), text, tokenizer, projector_type="mlp2x_gelu",
                           template="vicuna_v1")
    model.eval().language_model.set_attn_implementation(impl)
    b = _batch(model, tok)
    with torch.no_grad():
        fast = for_training(model)(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
        full = model(b["input_ids"], b["attention_mask"], b["pixel_values"])
    assert_reordered(fast.loss, causal_lm_loss(full.logits, b["labels"])[0], TINY_TERMS, TINY_FORWARD)


@pytest.mark.parametrize("connector", ["qformer", "resampler"])
def test_a_connector_is_shared_too_not_built_afresh(tokenizer, connector):
    model, _ = build_vlm(tiny_vision_config("clip"), tiny_text_config("llama", vocab_size=len(tokenizer)), tokenizer,
                         connector=connector, num_queries=4)
    fast = for_training(model)
    assert fast.connector is model.connector
    assert fast.state_dict().keys() == model.state_dict().keys()
