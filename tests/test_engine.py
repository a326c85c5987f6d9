"""The inference engine: batching, KV cache, sampling, stops, streaming, image reuse."""
from __future__ import annotations

import pytest
import torch
from conftest import make_model, noise_image, solid_image

from vistune.infer.detokenize import IncrementalDecoder, ReplyText
from vistune.infer.engine import Completion, Engine, GenerationConfig, Prompt, PromptError, PromptTooLong
from vistune.infer.sampling import apply_repetition_penalty, filter_top_k_top_p
from vistune.model.checkpoint import LoadedModel, save_model
from vistune.text.encode import IGNORE_INDEX, encode_conversation
from tolerances import TINY_FORWARD, TINY_TERMS, assert_reordered


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    model, tok = make_model(tokenizer)
    return Engine(LoadedModel(model, tok))


def mixed_prompts() -> list[Prompt]:
    return [
        Prompt.ask("what color is the circle?"),
        Prompt.ask("describe the image", [noise_image(1)]),
        Prompt([{"from": "human", "value": "<image>\nleft one. <image>\nright one. how many objects are there?"}],
               [noise_image(2), solid_image((0, 255, 0))]),
        Prompt([{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": "a red square"},
                {"from": "human", "value": "and on the left side?"}], [noise_image(3)]),
        Prompt.ask("yes", system="Answer in one word."),
    ]


def test_batched_equals_one_by_one_greedy(engine):
    prompts = mixed_prompts()
    cfg = GenerationConfig(max_new_tokens=12)
    batched = engine.generate(prompts, cfg)
    single = [engine.generate([p], cfg)[0] for p in prompts]
    assert len({c.prompt_tokens for c in batched}) > 2  # really mixed lengths
    assert batched == single
    for c in batched:
        assert isinstance(c, Completion) and c.completion_tokens >= 1 and c.finish_reason in ("stop", "length")


def test_rows_finishing_at_different_steps_leave_the_batch(engine):
    prompts = mixed_prompts()[:4]
    configs = [GenerationConfig(max_new_tokens=n) for n in (3, 15, 1, 9)]
    batched = engine.generate(prompts, configs)
    assert [c.completion_tokens for c in batched] == [3, 15, 1, 9]
    assert all(c.finish_reason == "length" for c in batched)
    assert batched == [engine.generate([p], c)[0] for p, c in zip(prompts, configs)]


def test_prompts_joining_a_running_batch_get_their_own_answers(engine):
    prompts = mixed_prompts()
    cfgs = [GenerationConfig(max_new_tokens=n) for n in (6, 14, 9, 12)]
    cfgs.append(GenerationConfig(max_new_tokens=10, temperature=1.0, seed=5))
    run = engine.start(prompts[:2], cfgs[:2], stream=[False, True])
    streamed: dict[int, str] = {}
    finished: list[int] = []
    for step, deltas in enumerate(run):
        for i, piece in deltas:
            streamed[i] = streamed.get(i, "") + piece
        finished += run.take_finished()
        if step == 2:  # longer and shorter prompts join mid-way, with and without images
            assert run.add([engine.encode(p) for p in prompts[2:4]], cfgs[2:4], [True, False]) == [2, 3]
        if step == 7:  # after row 0 has left
            assert 0 in finished and run.can_join(cfgs[4])
            run.add([engine.encode(prompts[4])], cfgs[4:], [False])
    assert sorted(finished) == [0, 1, 2, 3, 4]
    assert run.completions == [engine.generate([p], c)[0] for p, c in zip(prompts, cfgs)]
    assert streamed[1] == run.completions[1].text and streamed[2] == run.completions[2].text


def test_dynamic_cache_gives_the_same_tokens(engine):
    other = Engine(engine.loaded, preallocate_cache=False)
    prompts, cfg = mixed_prompts(), GenerationConfig(max_new_tokens=10)
    assert other.generate(prompts, cfg) == engine.generate(prompts, cfg)


def test_eager_attention_gets_the_same_tokens(engine, tokenizer):
    # Eager attention adds its mask, so it is fed the 2-D padding mask rather than SDPA's boolean 4-D view.
    model, tok = make_model(tokenizer)
    model.language_model.set_attn_implementation("eager")
    eager = Engine(LoadedModel(model, tok))
    assert engine.padding_mask_4d and not eager.padding_mask_4d
    cfg = GenerationConfig(max_new_tokens=10)
    for prompts in (mixed_prompts(), mixed_prompts()[:4]):  # the second shares its system prompt
        assert eager.generate(prompts, cfg) == engine.generate(prompts, cfg)


def test_stream_adds_up_to_generate(engine):
    for p in mixed_prompts()[:3]:
        cfg = GenerationConfig(max_new_tokens=16)
        pieces = list(engine.stream(p, cfg))
        assert len(pieces) > 1
        assert "".join(pieces) == engine.generate([p], cfg)[0].text


def test_user_stop_string_cuts_the_reply(engine):
    p = Prompt.ask("describe the image", [noise_image(1)])
    full = engine.generate([p], GenerationConfig(max_new_tokens=20))[0].text
    assert len(full) > 6
    stop = full[4:7]
    cut = engine.generate([p], GenerationConfig(max_new_tokens=20, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)].strip()
    assert stop not in cut.text
    streamed = "".join(engine.stream(p, GenerationConfig(max_new_tokens=20, stop=[stop])))
    assert streamed == cut.text


def test_eos_stops_generation(tokenizer):
    model, tok = make_model(tokenizer)
    eng = Engine(LoadedModel(model, tok))
    p = Prompt.ask("what color?")
    run = eng.start([p], GenerationConfig(max_new_tokens=1))
    list(run)
    first = run.rows[0].tokens[0]
    head = model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        # Make EOS the clear favourite: its logit becomes 10x that of the token greedy picked.
        head[tok.eos_token_id] = head[first] * 10
    out = eng.generate([p], GenerationConfig(max_new_tokens=8))[0]
    assert out.finish_reason == "stop" and out.text == "" and out.completion_tokens == 1


def test_stop_strings_by_template(tokenizer):
    ids, texts = Engine(LoadedModel(*make_model(tokenizer, template="chatml"))).stop_strings(GenerationConfig())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and texts == []
    ids, texts = Engine(LoadedModel(*make_model(tokenizer, template="v0"))).stop_strings(GenerationConfig(stop=["\n\n"]))
    assert texts == ["###", "\n\n"] and ids == {tokenizer.eos_token_id}
    ids, texts = Engine(LoadedModel(*make_model(tokenizer, template="llama_2"))).stop_strings(GenerationConfig())
    assert ids == {tokenizer.eos_token_id} and texts == []  # " </s>" is matched as the EOS id


def test_an_engine_asks_in_the_template_it_is_given_without_touching_the_model(tokenizer):
    loaded = LoadedModel(*make_model(tokenizer, template="chatml"))
    eng = Engine(loaded, template="v0")
    assert eng.template.name == "v0" and loaded.config.template == "chatml"
    ids, texts = eng.stop_strings(GenerationConfig())
    assert texts == ["###"] and tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids
    p = Prompt.ask("what is this?", [noise_image(0)])
    assert eng.encode(p).input_ids != Engine(loaded).encode(p).input_ids


def test_inference_prompt_is_the_training_prefix(engine):
    turns = [{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": "a red square"},
             {"from": "human", "value": "and on the left?"}]
    enc = engine.encode(Prompt(turns, [noise_image(0)]))
    full = encode_conversation(
        engine.tokenizer, engine.template, turns + [{"from": "gpt", "value": "a blue circle"}],
        image_token_id=engine.image_token_id, num_image_tokens=engine.num_image_tokens,
    )
    last_reply_start = max(i for i, lab in enumerate(full.labels)
                           if lab != IGNORE_INDEX and full.labels[i - 1] == IGNORE_INDEX)
    assert enc.input_ids == full.input_ids[:last_reply_start]


def test_images_go_first_without_placeholders(engine):
    imgs = [noise_image(1), noise_image(2)]
    implicit = engine.encode(Prompt.ask("compare them", imgs))
    explicit = engine.encode(Prompt.ask("<image>\n<image>\ncompare them", imgs))
    assert implicit.input_ids == explicit.input_ids
    assert implicit.input_ids.count(engine.image_token_id) == 2 * engine.num_image_tokens


def test_bad_prompts_are_refused_clearly(engine):
    with pytest.raises(PromptError, match="2 <image> placeholders but 1 images"):
        engine.encode(Prompt.ask("<image> and <image>", [noise_image(1)]))
    with pytest.raises(PromptError, match="roles out of order|ends with"):
        engine.encode(Prompt([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]))
    with pytest.raises(PromptError, match="image 0"):
        engine.encode(Prompt.ask("x", [torch.zeros(5)]))
    with pytest.raises(PromptTooLong, match="context"):
        engine.encode(Prompt.ask("red " * 3000))
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)


def test_image_features_are_computed_once(tokenizer):
    model, tok = make_model(tokenizer)
    eng = Engine(LoadedModel(model, tok))
    calls = []
    orig = model.encode_images
    model.encode_images = lambda px: (calls.append(px.shape[0]), orig(px))[1]
    img = noise_image(7)
    cfg = GenerationConfig(max_new_tokens=2)
    a = eng.generate([Prompt.ask("what is it?", [img])], cfg)
    b = eng.generate([Prompt.ask("what is it?", [img.copy()])], cfg)  # same pixels, new object
    assert calls == [1] and a == b
    # Projected embeddings passed in directly skip the vision tower and give the same answer.
    c = eng.generate([Prompt.ask("what is it?", [eng.image_embeds([img])[0]])], cfg)
    assert calls == [1] and c == a
    # Within one batch too: two questions about one new picture encode it once.
    other = noise_image(8)
    eng.generate([Prompt.ask("what is it?", [other]), Prompt.ask("and this?", [img]),
                  Prompt.ask("what colour is it?", [other.copy()])], cfg)
    assert calls == [1, 1]


def test_without_an_image_cache_images_are_neither_hashed_nor_kept(tokenizer, monkeypatch):
    model, tok = make_model(tokenizer)
    eng = Engine(LoadedModel(model, tok), image_cache_size=0)
    calls = []
    orig = model.encode_images
    model.encode_images = lambda px: (calls.append(px.shape[0]), orig(px))[1]
    monkeypatch.setattr("vistune.infer.engine.image_key", lambda im: pytest.fail("hashed an image for no cache"))
    p, cfg = Prompt.ask("what is it?", [noise_image(7)]), GenerationConfig(max_new_tokens=2)
    assert eng.generate([p], cfg) == eng.generate([p], cfg)
    assert calls == [1, 1] and len(eng.image_cache) == 0
    eng.generate([p, Prompt.ask("and the colour?", p.images)], cfg)  # the very same object: known without hashing
    assert calls == [1, 1, 1]


def test_seeded_sampling_is_reproducible(engine):
    prompts = mixed_prompts()[:3]
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=123)
    a = engine.generate(prompts, cfg)
    b = engine.generate(prompts, cfg)
    assert a == b
    alone = engine.generate([prompts[1]], cfg)[0]
    assert alone == a[1]  # a row's random stream does not depend on its neighbours
    other = engine.generate(prompts, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7))
    assert other != a


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    prompts = mixed_prompts()[:2]
    greedy = engine.generate(prompts, GenerationConfig(max_new_tokens=10))
    assert engine.generate(prompts, GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=1, seed=1)) == greedy
    assert engine.generate(prompts, GenerationConfig(max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=2)) == greedy


def test_repetition_penalty_changes_and_is_per_row(engine):
    p = mixed_prompts()[1]
    plain = engine.generate([p], GenerationConfig(max_new_tokens=20))[0]
    penal = GenerationConfig(max_new_tokens=20, repetition_penalty=5.0)
    pen = engine.generate([p], penal)[0]
    assert pen != plain
    # Mixed in one batch, each row keeps its own setting.
    assert engine.generate([p, p], [GenerationConfig(max_new_tokens=20), penal]) == [plain, pen]


def test_sampling_filters():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits[None], torch.tensor([[0, 1, 1]]), torch.tensor([[2.0]]))[0]
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    kept = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isinf(kept).tolist() == [False, True, True, False]
    p = logits.softmax(-1)  # 3.0 holds ~0.63 of the mass, 2.0 ~0.23
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.7)
    assert torch.isinf(kept).tolist() == [False, True, True, False] and p[3] < 0.7


def test_incremental_decoding_is_safe_across_token_boundaries(tokenizer):
    text = "naïve café — 你好 🙂 red circle"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_reply_text_holds_back_possible_stops():
    r = ReplyText(["###"])
    shown = []
    for piece in [" Hello", " wor", "ld #", "#", "# ignored"]:
        r.add(piece)
        shown.append(r.pending())
    shown.append(r.pending(final=True))
    assert r.stopped and r.text == "Hello world"
    assert shown == ["Hello", " wor", "ld", "", "", ""]  # " #" and "##" waited, then were cut


def test_from_path_round_trip(tokenizer, tmp_path):
    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "m")
    p, cfg = mixed_prompts()[2], GenerationConfig(max_new_tokens=8)
    assert Engine.from_path(path).generate([p], cfg) == Engine(LoadedModel(model, tok)).generate([p], cfg)
    assert Engine.from_path(path).name == "m"


def test_a_batch_that_keeps_taking_newcomers_stays_short(engine):
    prompts = mixed_prompts()
    cfg = GenerationConfig(max_new_tokens=12)
    run = engine.start([prompts[0]], cfg)
    lengths, added = [], [0]
    for step, _ in enumerate(run):
        if step % 4 == 3 and len(added) < 15:  # a newcomer every 4 steps, 14 of them
            added += run.add([engine.encode(prompts[len(added) % 5])], [cfg], [False])
        lengths.append(run._state.length if run._state else 0)
    longest_prompt = max(engine.encode(p).input_ids.__len__() for p in prompts)
    assert max(lengths) <= longest_prompt + 12  # no padding piles up on the left
    assert run.completions == [engine.generate([prompts[i % 5]], cfg)[0] for i in range(len(added))]


def _lm_calls(engine: Engine, prompts: list[Prompt], cfg: GenerationConfig) -> tuple[list, list, list[Completion]]:
    """(batch, length) of every language-model call while generating, each call's last-position
    logits, and the completions."""
    seen: list[tuple[int, int]] = []
    logits: list[torch.Tensor] = []

    def record(_module, _args, kw, out):
        x = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw["input_ids"]
        seen.append(tuple(x.shape[:2]))
        logits.append(out.logits[:, -1].clone())

    hook = engine.lm.register_forward_hook(record, with_kwargs=True)
    try:
        out = engine.generate(prompts, cfg)
    finally:
        hook.remove()
    return seen, logits, out


def test_a_common_prefix_is_prefilled_once(engine):
    # Same system prompt, different questions, images and lengths (one prompt twice).
    prompts = mixed_prompts()[:4] + [mixed_prompts()[1]]
    ids = [engine.encode(p).input_ids for p in prompts]
    shared = next(i for i in range(len(ids[0])) if len({tuple(x[: i + 1]) for x in ids}) > 1)
    assert shared >= 16 and all(engine.image_token_id not in x[:shared] for x in ids)
    stored = len(engine.template_prefix.ids)  # of the prefix, the system prompt is stored, not computed
    assert 0 < stored < shared
    alone = [_lm_calls(engine, [p], GenerationConfig(max_new_tokens=1))[1][0][0] for p in prompts]
    for cfg in (GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=10, repetition_penalty=1.5)):
        seen, logits, batched = _lm_calls(engine, prompts, cfg)
        # The prefix once for the batch, then every row's own part, padded to the longest.
        assert seen[:2] == [(1, shared - stored), (5, max(map(len, ids)) - shared)]
        # Batched rows over a cached prefix against each prompt alone: the same sums, other blocking.
        assert_reordered(logits[1], torch.stack(alone), TINY_TERMS, TINY_FORWARD)
        assert batched == [engine.generate([p], cfg)[0] for p in prompts]
    # Identical prompts share all but their last token, which each row still prefills itself.
    same = [Prompt.ask("what color is the circle?")] * 3
    n = len(engine.encode(same[0]).input_ids)
    seen, _, batched = _lm_calls(engine, same, GenerationConfig(max_new_tokens=6))
    assert seen[:2] == [(1, n - 1 - stored), (3, 1)]
    assert batched == [engine.generate([same[0]], GenerationConfig(max_new_tokens=6))[0]] * 3


def test_a_common_image_is_part_of_the_shared_prefix(engine):
    img = noise_image(4)
    prompts = [Prompt.ask(q, [im]) for q, im in [("what is it?", img), ("describe the colours in detail", img.copy()),
                                                 ("how many?", img), ("what is it?", noise_image(5))]]
    ids = [engine.encode(p).input_ids for p in prompts]
    before_image = ids[0].index(engine.image_token_id)
    through_image = next(i for i in range(len(ids[0])) if len({tuple(x[: i + 1]) for x in ids[:3]}) > 1)
    assert through_image > before_image + engine.num_image_tokens  # the image and the line break after it
    cfg = GenerationConfig(max_new_tokens=8)
    alone = [_lm_calls(engine, [p], GenerationConfig(max_new_tokens=1))[1][0][0] for p in prompts]
    # Three questions about one picture share it; a fourth, about another picture, stops the prefix before it.
    for batch, shared in ((prompts[:3], through_image), (prompts, before_image)):
        seen, logits, batched = _lm_calls(engine, batch, cfg)
        own = (len(batch), max(len(ids[i]) for i in range(len(batch))) - shared)
        stored = len(engine.template_prefix.ids)
        prefix_calls = [(1, shared - stored)] if shared > stored else []  # the stored part is not computed
        assert seen[: len(prefix_calls) + 1] == prefix_calls + [own]
        assert_reordered(logits[len(prefix_calls)], torch.stack(alone[: len(batch)]), TINY_TERMS, TINY_FORWARD)
        assert batched == [engine.generate([p], cfg)[0] for p in batch]


def test_a_short_common_prefix_is_not_split_off(engine):
    # Two prompts with different system prompts share little more than BOS: one plain prefill.
    prompts = [mixed_prompts()[0], mixed_prompts()[4]]
    seen, _, batched = _lm_calls(engine, prompts, GenerationConfig(max_new_tokens=4))
    assert seen[0] == (2, max(len(engine.encode(p).input_ids) for p in prompts))
    assert batched == [engine.generate([p], GenerationConfig(max_new_tokens=4))[0] for p in prompts]


def test_a_shared_prefix_never_splits_an_image(engine):
    run = engine.start([Prompt.ask("hi")], GenerationConfig(max_new_tokens=1))
    img, t = engine.image_token_id, engine.num_image_tokens
    embeds = [torch.ones(1, t, 8), torch.ones(1, t, 8)]
    # The second prompt ends inside the image: its last token must stay its own, so the image stays out.
    assert run._shared_prefix([[1] * 60 + [img] * t + [7], [1] * 60 + [img] * t], embeds) == (60, 0)
    assert run._shared_prefix([[1] * 60 + [img] * t + [7], [1] * 60 + [img] * t + [8]], embeds) == (60 + t, 1)
    assert run._shared_prefix([[1] * 60 + [img] * t + [7], [1] * 60 + [img] * t + [8]],
                              [embeds[0], embeds[1] * 2]) == (60, 0)  # another picture


def test_the_template_prefix_is_prefilled_once_per_engine(tokenizer):
    model, tok = make_model(tokenizer)
    engine, plain = Engine(LoadedModel(model, tok)), Engine(LoadedModel(model, tok))
    plain.template_prefix = None  # the reference: every prompt prefilled whole
    engine.reuse_turns = plain.reuse_turns = False  # this store alone (the last turn: below)
    stored = engine.template_prefix.ids
    cfg = GenerationConfig(max_new_tokens=8)
    for prompt in mixed_prompts():
        ids = engine.encode(prompt).input_ids
        uses = ids[: len(stored)] == stored
        assert uses == (prompt.system is None)  # another system prompt starts otherwise
        seen, logits, out = _lm_calls(engine, [prompt], cfg)
        _, ref_logits, ref = _lm_calls(plain, [prompt], cfg)
        assert seen[0] == (1, len(ids) - len(stored) if uses else len(ids))
        assert_reordered(logits[0], ref_logits[0], TINY_TERMS, TINY_FORWARD)  # a stored prefix: other blocking
        assert out == ref
