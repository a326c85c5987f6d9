"""The generated Jinja chat template renders every vistune template exactly as `render` does."""
import copy

import pytest

from vistune.interop.chat_template import bos_in_template, guess_template_name, jinja_chat_template, tokenizer_adds_bos
from vistune.text.templates import TEMPLATES, render

CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat is shown?"}],
    [{"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}],
    [{"from": "human", "value": "no image, just text"}, {"from": "gpt", "value": "fine"},
     {"from": "human", "value": "<image>\nand now?"}, {"from": "gpt", "value": "a red circle"}],
]


def hf_messages(turns, parts: bool):
    """vistune turns as Hugging Face messages: list-of-parts (image first) or plain strings."""
    out = []
    for t in turns:
        role = "user" if t["from"] == "human" else "assistant"
        v = t["value"]
        if parts and role == "user" and v.startswith("<image>\n"):
            out.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": v[len("<image>\n"):]}]})
        elif parts:
            out.append({"role": role, "content": [{"type": "text", "text": v}]})
        else:
            out.append({"role": role, "content": v})
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("parts", [True, False])
@pytest.mark.parametrize("system", [None, "Answer briefly.", ""])
def test_jinja_equals_render(tokenizer, name, parts, system):
    t = TEMPLATES[name]
    jinja = jinja_chat_template(t, tokenizer)
    for turns in CONVERSATIONS:
        if t.single_turn and len(turns) > 2:
            continue
        gen = len(turns) % 2 == 1
        want = render(t, turns, system=system, add_generation_prompt=gen, eos=tokenizer.eos_token,
                      bos=tokenizer.bos_token).text
        msgs = hf_messages(turns, parts)
        if system is not None:
            msgs = [{"role": "system", "content": system}] + msgs
        got = tokenizer.apply_chat_template(msgs, chat_template=jinja, tokenize=False, add_generation_prompt=gen)
        assert got == tokenizer.bos_token + want, (name, turns)


def test_bad_conversations_raise(tokenizer):
    jinja = jinja_chat_template("vicuna_v1", tokenizer)
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}], chat_template=jinja, tokenize=False)
    plain = jinja_chat_template("plain", tokenizer)
    two = hf_messages(CONVERSATIONS[2], parts=True)
    with pytest.raises(Exception, match="single exchange"):
        tokenizer.apply_chat_template(two, chat_template=plain, tokenize=False)


def test_no_bos_in_template_when_tokenizer_adds_none(tokenizer):
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert tokenizer_adds_bos(tokenizer) and not tokenizer_adds_bos(tok)
    msgs = hf_messages(CONVERSATIONS[0], parts=True)
    text = tok.apply_chat_template(msgs, chat_template=jinja_chat_template("chatml", tok), tokenize=False,
                                   add_generation_prompt=True)
    assert text == render("chatml", CONVERSATIONS[0], add_generation_prompt=True, eos=tok.eos_token).text


@pytest.mark.parametrize("source,name", [
    ("{{ 'USER: ' }}...{{ 'ASSISTANT:' }}", "vicuna_v1"),
    ("<|im_start|>{{ m['role'] }}", "chatml"),
    ("[INST] {{ x }} [/INST]", "llama_2"),
    ("###Human: ", "v0"),
    ("{{ messages }}", None),
    (None, None),
])
def test_guess_template_name(source, name):
    assert guess_template_name(source) == name


def test_guess_reads_vistunes_own_tag(tokenizer):
    assert guess_template_name(jinja_chat_template("mpt", tokenizer)) == "mpt"


def test_bos_left_to_the_processor_for_sentencepiece_llama(tmp_path):
    from transformers import AutoTokenizer

    from interop_helpers import sentencepiece_llama_tokenizer
    from vistune.text.templates import get_template

    sp = AutoTokenizer.from_pretrained(str(sentencepiece_llama_tokenizer(tmp_path)))
    # "<s>A chat" as text loses the "\u2581" SentencePiece puts before "A" when it adds BOS itself.
    assert tokenizer_adds_bos(sp) and not bos_in_template(get_template("vicuna_v1"), sp)
    msgs = hf_messages(CONVERSATIONS[1], parts=True)
    text = sp.apply_chat_template(msgs, chat_template=jinja_chat_template("vicuna_v1", sp), tokenize=False,
                                  add_generation_prompt=True)
    assert text == render("vicuna_v1", CONVERSATIONS[1], add_generation_prompt=True, eos=sp.eos_token,
                          bos=sp.bos_token).text


def test_a_template_that_wraps_images_is_refused_for_llama_cpp(tokenizer):
    from vistune.interop import InteropError

    with pytest.raises(InteropError, match="template 'minigpt4' writes images as"):
        jinja_chat_template("minigpt4", tokenizer, llama_cpp=True)
