import pytest

from vistune.text.encode import IGNORE_INDEX, EncodingError, SampleTooLong, encode_conversation
from vistune.text.templates import TEMPLATES

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "There are three objects."},
]


def img_id(tok):
    return tok.convert_tokens_to_ids("<image>")


def supervised_runs(labels):
    runs, cur = [], []
    for lab in labels:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exactly_replies_and_stops_supervised(tokenizer, name):
    conv = CONV[:2] if name == "plain" else CONV
    enc = encode_conversation(tokenizer, name, conv, image_token_id=img_id(tokenizer), num_image_tokens=5)
    runs = supervised_runs(enc.labels)
    stop = TEMPLATES[name].stop_string(tokenizer.eos_token, tokenizer.bos_token)
    replies = [t["value"] for t in conv if t["from"] == "gpt"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert tokenizer.decode(run).strip() == (reply + stop).strip()
    # Every supervised label equals its input id (next-token shift happens in the loss).
    for i, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, i)
    # Image tokens: expanded and never supervised.
    positions = [k for k, t in enumerate(enc.input_ids) if t == img_id(tokenizer)]
    assert len(positions) == 5 and positions == list(range(positions[0], positions[0] + 5))
    assert all(enc.labels[k] == IGNORE_INDEX for k in positions)
    # Nothing from the user turns or the system prompt is supervised.
    supervised_text = tokenizer.decode([lab for lab in enc.labels if lab != IGNORE_INDEX])
    assert "What color" not in supervised_text and "How many" not in supervised_text


def test_generation_prompt_has_no_labels(tokenizer):
    enc = encode_conversation(tokenizer, "vicuna_v1", CONV[:1], image_token_id=img_id(tokenizer),
                              num_image_tokens=3, add_generation_prompt=True)
    assert all(lab == IGNORE_INDEX for lab in enc.labels)
    assert enc.text.endswith("ASSISTANT:")


def test_prompt_tokens_are_a_prefix_of_training_tokens(tokenizer):
    """What the model sees at inference equals the start of what it was trained on."""
    train = encode_conversation(tokenizer, "v0", CONV[:2], image_token_id=img_id(tokenizer), num_image_tokens=2)
    prompt = encode_conversation(tokenizer, "v0", CONV[:1], image_token_id=img_id(tokenizer), num_image_tokens=2,
                                 add_generation_prompt=True)
    assert train.input_ids[: len(prompt.input_ids)] == prompt.input_ids


def test_mismatch_raises_naming_record(tokenizer, monkeypatch):
    # A tokenizer whose decode disagrees with its encode must never train silently.
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: "garbage")
    with pytest.raises(EncodingError, match=r"record 'rec-7'.*tokenization mismatch"):
        encode_conversation(tokenizer, "vicuna_v1", CONV, image_token_id=img_id(tokenizer), num_image_tokens=2,
                            record_id="rec-7")


def test_truncation_only_removes_text(tokenizer):
    full = encode_conversation(tokenizer, "vicuna_v1", CONV, image_token_id=img_id(tokenizer), num_image_tokens=4)
    cut = encode_conversation(tokenizer, "vicuna_v1", CONV, image_token_id=img_id(tokenizer), num_image_tokens=4,
                              max_length=len(full) - 3)
    assert cut.input_ids == full.input_ids[: len(full) - 3]
    assert cut.input_ids.count(img_id(tokenizer)) == 4
    assert (cut.cut, full.cut) == (3, 0)  # what training reports as cut


def test_truncation_into_image_is_an_error(tokenizer):
    with pytest.raises(SampleTooLong, match=r"record 'long-1'.*cut into an image"):
        encode_conversation(tokenizer, "vicuna_v1", CONV, image_token_id=img_id(tokenizer), num_image_tokens=300,
                            max_length=200, record_id="long-1")


def test_truncation_removing_all_supervision_is_an_error(tokenizer):
    with pytest.raises(SampleTooLong, match="removes every supervised token"):
        encode_conversation(tokenizer, "vicuna_v1", CONV, image_token_id=img_id(tokenizer), num_image_tokens=1,
                            max_length=8, record_id="x", system="")


def test_bad_conversation_names_record(tokenizer):
    with pytest.raises(EncodingError, match="record 'r1'.*roles out of order"):
        encode_conversation(tokenizer, "vicuna_v1", [CONV[1], CONV[0]], image_token_id=img_id(tokenizer),
                            num_image_tokens=1, record_id="r1")


@pytest.mark.parametrize("name", ["vicuna_v1", "v0", "chatml", "llama_2"])
def test_masks_hold_for_gpt2_style_tokenizer(name):
    """A real-world byte-level tokenizer with a different EOS (GPT-2 style)."""
    from vistune.text.tokenizer import train_bpe_tokenizer
    from transformers import PreTrainedTokenizerFast

    base = train_bpe_tokenizer(["hello there the circle is red"] * 20, vocab_size=300)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<pad>")
    tok.add_special_tokens({"extra_special_tokens": ["<image>", "<|endoftext|>"]}, replace_extra_special_tokens=False)
    enc = encode_conversation(tok, name, CONV, image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=2)
    runs = supervised_runs(enc.labels)
    assert len(runs) == 2
    assert tok.decode(runs[1]).strip().startswith("There are three objects.")
