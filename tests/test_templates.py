import pytest

from vistune.text.templates import (
    LLAMA_2_SYSTEM, LLAVA_SYSTEM_HUMAN, LLAVA_SYSTEM_USER, MINIGPT4_INSTRUCTIONS, MINIGPT4_SYSTEM, TEMPLATES,
    TemplateError, get_template, render,
)

TURNS = [
    {"from": "human", "value": "<image>\nQ1"},
    {"from": "gpt", "value": "A1"},
    {"from": "human", "value": "Q2"},
]

# The exact prompts of ../shared/LLAVA_REFERENCE.md section 2 (generation prompt after Q2).
EXPECTED = {
    "v0": f"{LLAVA_SYSTEM_HUMAN}###Human: <image>\nQ1###Assistant: A1###Human: Q2###Assistant:",
    "vicuna_v1": f"{LLAVA_SYSTEM_USER} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "llava_v1": f"{LLAVA_SYSTEM_HUMAN} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "llama_2": f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]",
    "mpt": "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
           "helpful and honest answers.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|><|im_start|>assistant\nA1"
           "<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
    "minigpt4": "###Human: <Img><image></Img> Q1 ###Assistant: A1###Human: Q2 ###Assistant:",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n"
              "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_strings(name):
    r = render(name, TURNS, add_generation_prompt=True)
    assert r.text == EXPECTED[name]
    assert r.supervised_texts() == [{"v0": "A1###", "minigpt4": "A1###", "llama_2": "A1 </s>", "mpt": "A1<|im_end|>",
                                     "chatml": "A1<|im_end|>"}.get(name, "A1</s>")]


def test_plain_drops_instruction_and_supervises_caption_and_newline():
    r = render("plain", [{"from": "human", "value": "Describe this briefly.\n<image>"}, {"from": "gpt", "value": "A cat."}])
    assert r.text == "<image>A cat.\n"
    assert r.supervised_texts() == ["A cat.\n"]


def test_eos_follows_tokenizer():
    r = render("vicuna_v1", TURNS[:2], eos="<|endoftext|>")
    assert r.text.endswith("A1<|endoftext|>")


def test_unknown_template_names_known_ones():
    with pytest.raises(TemplateError, match="unknown template 'vicuna'.*vicuna_v1"):
        get_template("vicuna")


@pytest.mark.parametrize("turns,msg", [
    ([{"from": "gpt", "value": "hi"}], "roles out of order"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "roles out of order"),
    ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}], "empty"),
    ([{"from": "robot", "value": "q"}], "unknown role"),
    ([{"from": "human", "value": "q"}], "ends with a human turn"),
    ([], "no turns"),
])
def test_bad_conversations(turns, msg):
    with pytest.raises(TemplateError, match=msg):
        render("vicuna_v1", turns)


def test_plain_is_single_turn():
    with pytest.raises(TemplateError, match="single exchange"):
        render("plain", TURNS + [{"from": "gpt", "value": "A2"}])


def test_custom_template_from_dict():
    t = get_template({"name": "mine", "system": "S", "system_format": "{system}\n", "user_prefix": "Q: ",
                      "user_suffix": "\n", "assistant_prefix": "A:", "reply_lead": " ", "stop": "{eos}"})
    assert render(t, TURNS[:2]).text == "S\nQ: <image>\nQ1\nA: A1</s>"
    with pytest.raises(TemplateError, match="unknown template fields"):
        get_template({"name": "x", "sytem": "typo"})


def test_all_templates_registered():
    assert {"plain", "v0", "vicuna_v1", "llama_2", "chatml"} <= set(TEMPLATES)


def test_minigpt4_renders_its_stage2_prompt_and_chat_prompt():
    # MiniGPT-4's prompts/alignment.txt, each line formatted into '###Human: {} ###Assistant: ' in training
    pool = ["<Img><ImageHere></Img> Describe this image in detail.",
            "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
            "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
            "<Img><ImageHere></Img> Could you describe the contents of this image for me?"]
    assert [f"<Img><ImageHere></Img> {i}" for i in MINIGPT4_INSTRUCTIONS] == pool
    for line in pool:
        r = render("minigpt4", [{"from": "human", "value": line.replace("<Img><ImageHere></Img> ", "<image>\n")},
                                {"from": "gpt", "value": "A red circle."}])
        want = "###Human: {} ###Assistant: ".format(line).replace("<ImageHere>", "<image>") + "A red circle.###"
        assert r.text == want and r.supervised_texts() == ["A red circle.###"]
    # with its chat system text, the prompt opens as its demo's does: system + '###Human: '
    chat = render("minigpt4", [{"from": "human", "value": "<image>what is it?"}], system=MINIGPT4_SYSTEM,
                  add_generation_prompt=True)
    assert chat.text == MINIGPT4_SYSTEM + "###Human: <Img><image></Img> what is it? ###Assistant:"
    assert TEMPLATES["minigpt4"].stop_string() == "###"
