from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from conftest import make_model
from vistune.data.collate import PadCollator
from vistune.model import last_layer
from vistune.model.vlm import IGNORE_INDEX, causal_training_mask
from test_vlm import sample
from tolerances import TINY_BACKWARD, TINY_FORWARD, TINY_TERMS, assert_grads_reordered, assert_reordered

LAYOUTS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_lm(kind: str, impl: str, **kw):
    config_cls, model_cls = LAYOUTS[kind]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, **kw)
    lm = model_cls(cfg).double()
    lm.set_attn_implementation(impl)
    return lm


def labels_for(b: int, n: int) -> torch.Tensor:
    labels = torch.full((b, n), IGNORE_INDEX)
    labels[0, 5:9] = 7  # a short reply
    labels[1, 11:] = 3  # a reply that runs to the end
    labels[2, 2] = 1  # one token
    return labels


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_the_rows_get_the_full_stacks_hidden_states(kind, impl):
    lm = tiny_lm(kind, impl)
    embeds = torch.randn(3, 20, 48, dtype=torch.double)
    labels = labels_for(3, 20)
    mask = causal_training_mask(torch.ones(3, 20, dtype=torch.long), impl, embeds.dtype)
    assert last_layer.supports(lm.model, 20)
    full = lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    rows = last_layer.supervised_rows(labels)
    got = last_layer.hidden_at_rows(lm.model, embeds, mask, rows)
    supervised = labels[:, 1:].gather(1, rows) != IGNORE_INDEX
    assert int(supervised.sum()) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    want = full.gather(1, rows[..., None].expand(-1, -1, 48))
    # The last layer alone at the rows, summed in another blocking than the whole stack's; fp64, but
    # transformers computes the rotary angles in fp32, so fp32's bound.
    assert_reordered(got[supervised], want[supervised], TINY_TERMS, TINY_FORWARD, dtype=torch.float32)


def test_supervised_rows_lists_each_rows_positions_in_order():
    labels = labels_for(3, 20)
    rows = last_layer.supervised_rows(labels)
    # A position is a row where the next token is supervised; row 1 has the most (10..18).
    assert rows.shape == (3, 9)
    assert rows[0, :4].tolist() == [4, 5, 6, 7]
    assert rows[1].tolist() == list(range(10, 19))
    assert rows[2, 0].tolist() == 1
    # What fills a shorter row is never supervised, so the loss skips it.
    targets = labels[:, 1:].gather(1, rows)
    assert (targets[0, 4:] == IGNORE_INDEX).all() and (targets[2, 1:] == IGNORE_INDEX).all()
    assert (targets[0, :4] == 7).all() and (targets[1] == 3).all()


def test_only_the_layouts_it_mirrors_take_the_rows_path():
    assert not last_layer.supports(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)).transformer, 10)
    assert last_layer.supports(tiny_lm("llama", "eager").model, 10)
    packed = tiny_lm("llama", "eager")
    packed.config._attn_implementation = "vistune_packed"  # another attention function: the whole stack
    assert not last_layer.supports(packed.model, 10)
    # A wrapped layer (FSDP, a checkpoint wrapper) gathers its parameters in its own forward only.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    wrapped = tiny_lm("llama", "eager")
    wrapped.model.layers[-1] = checkpoint_wrapper(wrapped.model.layers[-1])
    assert not last_layer.supports(wrapped.model, 10)
    # A sliding window shorter than the sequence masks what the causal mask would not.
    windowed = tiny_lm("mistral", "eager", sliding_window=8)
    assert last_layer.supports(windowed.model, 8) and not last_layer.supports(windowed.model, 9)
    # Attention dropout applies while training; the rows' attention would leave it out.
    dropout = tiny_lm("llama", "eager", attention_dropout=0.1)
    assert last_layer.supports(dropout.model.eval(), 10)
    assert not last_layer.supports(dropout.model.train(), 10)


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_the_training_loss_and_gradients_are_the_full_stacks(tokenizer, monkeypatch, text):
    model, tok = make_model(tokenizer, text=text)
    model.train()
    b = PadCollator(tok.pad_token_id)([sample(model, tok, "<image>\nWhat color is the circle?", 1),
                                        sample(model, tok, "Q?", 0, reply="Yes, there is one.")])
    params = [p for p in model.parameters() if p.requires_grad]
    calls = []
    rows_path = model.last_layer_at_rows
    model.last_layer_at_rows = lambda *a: calls.append(1) or rows_path(*a)
    results = []
    for use_rows in (True, False):
        if not use_rows:
            monkeypatch.setattr(last_layer, "supports", lambda decoder, seq_len: False)
        model.zero_grad()
        out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=b["labels"])
        out.loss.backward()
        results.append((out.loss.detach(), out.num_supervised, [None if p.grad is None else p.grad.clone() for p in params]))
    assert calls == [1]  # the first pass took the rows path, the second the whole stack
    (rows_loss, rows_n, rows_grads), (full_loss, full_n, full_grads) = results
    assert rows_n == full_n == int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    assert_reordered(rows_loss, full_loss, TINY_TERMS, TINY_FORWARD)  # the same sums in another blocking
    assert [g is None for g in rows_grads] == [g is None for g in full_grads]
    assert sum(g is not None for g in rows_grads) > 0
    assert_grads_reordered(rows_grads, full_grads, TINY_TERMS, TINY_BACKWARD)


def test_left_padding_and_unsupervised_batches_take_the_whole_stack(tiny_model):
    model, tok = tiny_model
    model.last_layer_at_rows = lambda *a: pytest.fail("the rows path ran")
    b = PadCollator(tok.pad_token_id)([sample(model, tok, "<image>\nQ?", 1), sample(model, tok, "Q?", 0)])
    left = {k: v for k, v in b.items()}
    # Left padding: move each row's padding to its front.
    ids, mask, labels = b["input_ids"].clone(), b["attention_mask"].clone(), b["labels"].clone()
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        for t in (ids, mask, labels):
            t[i] = torch.roll(t[i], ids.shape[1] - n)
    left.update(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        out = model(left["input_ids"], left["attention_mask"], left["pixel_values"], labels=left["labels"])
        assert out.num_supervised > 0
        none = torch.full_like(b["labels"], IGNORE_INDEX)
        out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], labels=none)
    assert out.num_supervised == 0 and float(out.loss) == 0.0
