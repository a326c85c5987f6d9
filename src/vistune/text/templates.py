"""Conversation templates as data.

A template is a handful of strings. One renderer (`render`) turns any conversation
into text plus the character spans that training supervises (each assistant reply
and its stop sequence), so adding a template never means writing a new
preprocessing function.

`{bos}` and `{eos}` inside template strings are replaced by the tokenizer's own
special tokens, so `vicuna_v1` stops on `</s>` with a Llama tokenizer and on
`<|endoftext|>` with GPT-2's.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

IMAGE_PLACEHOLDER = "<image>"

LLAVA_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# MiniGPT-4's stage-2 instructions (its prompts/alignment.txt), one drawn per record.
MINIGPT4_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
# MiniGPT-4's chat system text (training used none).
MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks "
    "using natural language."
)


class TemplateError(ValueError):
    """A conversation cannot be rendered with a template (or the template is unknown)."""


@dataclass(frozen=True)
class Template:
    """How one conversation style is written out.

    Rendered text: ``system_format`` (at the start, or inside the first user turn when
    ``system_in_first_user``), then for each user turn ``user_prefix + text +
    user_suffix`` and for each assistant turn ``assistant_prefix + reply_lead + reply +
    stop + after_stop``. Only ``reply + stop`` is supervised; ``reply_lead`` (a space
    that byte-level tokenizers merge into the reply's first token) is not, and
    ``after_stop`` never is.
    """

    name: str
    system: str = ""
    system_format: str = "{system}"
    system_in_first_user: bool = False
    user_prefix: str = ""
    first_user_prefix: str | None = None
    user_suffix: str = ""
    assistant_prefix: str = ""
    reply_lead: str = ""
    stop: str = "{eos}"
    after_stop: str = ""
    # plain (stage 1): the instruction text is dropped, only the image placeholders stay.
    user_images_only: bool = False
    single_turn: bool = False
    # How a user turn writes each image (``{image}``: the placeholder, with a newline after it
    # taken in); empty: as the record has it.
    image_format: str = ""

    def stop_string(self, eos: str = "</s>", bos: str = "<s>") -> str:
        return _fill(self.stop, eos, bos)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Template":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise TemplateError(f"unknown template fields: {sorted(unknown)}")
        return cls(**d)


def _fill(s: str, eos: str, bos: str) -> str:
    return s.replace("{eos}", eos).replace("{bos}", bos)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(name="plain", system="", user_images_only=True, stop="\n", single_turn=True),
        # LLaVA v0: '###' separates every message and is the stop sequence.
        Template(
            name="v0",
            system=LLAVA_SYSTEM_HUMAN,
            system_format="{system}###",
            user_prefix="Human: ",
            user_suffix="###",
            assistant_prefix="Assistant:",
            reply_lead=" ",
            stop="###",
        ),
        Template(
            name="vicuna_v1",
            system=LLAVA_SYSTEM_USER,
            system_format="{system} ",
            user_prefix="USER: ",
            user_suffix=" ",
            assistant_prefix="ASSISTANT:",
            reply_lead=" ",
            stop="{eos}",
        ),
        Template(
            name="llava_v1",
            system=LLAVA_SYSTEM_HUMAN,
            system_format="{system} ",
            user_prefix="USER: ",
            user_suffix=" ",
            assistant_prefix="ASSISTANT:",
            reply_lead=" ",
            stop="{eos}",
        ),
        Template(
            name="llama_2",
            system=LLAMA_2_SYSTEM,
            system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
            system_in_first_user=True,
            first_user_prefix="[INST] ",
            user_prefix="{bos}[INST] ",
            user_suffix=" [/INST]",
            reply_lead=" ",
            stop=" {eos}",
        ),
        # MiniGPT-4 stage 2: '###Human: <Img><ImageHere></Img> {instruction} ###Assistant: {answer}###';
        # '###' ends each reply and is the stop, later turns open with 'Human: ' as in its chat.
        Template(
            name="minigpt4",
            first_user_prefix="###Human: ",
            user_prefix="Human: ",
            user_suffix=" ",
            assistant_prefix="###Assistant:",
            reply_lead=" ",
            stop="###",
            image_format="<Img>{image}</Img> ",
        ),
        # Standard ChatML, as Qwen2 and most recent LLMs were trained on it.
        Template(
            name="chatml",
            system="You are a helpful assistant.",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            user_prefix="<|im_start|>user\n",
            user_suffix="<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            stop="<|im_end|>",
            after_stop="\n",
        ),
        # LLaVA's 'mpt' variant of ChatML: no newline between messages.
        Template(
            name="mpt",
            system="A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
            system_format="<|im_start|>system\n{system}<|im_end|>",
            user_prefix="<|im_start|>user\n",
            user_suffix="<|im_end|>",
            assistant_prefix="<|im_start|>assistant\n",
            stop="<|im_end|>",
        ),
    ]
}


def get_template(name_or_template: str | Template | dict) -> Template:
    """Look a template up by name (or accept a Template / its dict form)."""
    if isinstance(name_or_template, Template):
        return name_or_template
    if isinstance(name_or_template, dict):
        return Template.from_dict(name_or_template)
    try:
        return TEMPLATES[name_or_template]
    except KeyError:
        raise TemplateError(
            f"unknown template {name_or_template!r}; known templates: {', '.join(sorted(TEMPLATES))}"
        ) from None


@dataclass
class Rendered:
    """Text of a rendered conversation and the character spans that are supervised."""

    text: str
    supervised: list[tuple[int, int]] = field(default_factory=list)

    def supervised_texts(self) -> list[str]:
        return [self.text[a:b] for a, b in self.supervised]


HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def render(
    template: Template | str,
    turns: Sequence[dict] | Iterable[dict],
    *,
    system: str | None = None,
    add_generation_prompt: bool = False,
    eos: str = "</s>",
    bos: str = "<s>",
) -> Rendered:
    """Render a conversation (LLaVA turns: ``{"from": "human"|"gpt", "value": str}``).

    Raises TemplateError for roles out of order, empty turns, or a final human turn
    without ``add_generation_prompt``. ``system`` overrides the template's system text.
    """
    t = get_template(template)
    turns = list(turns)
    sys_text = t.system if system is None else system
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str, supervised: bool = False) -> None:
        nonlocal pos
        if not s:
            return
        parts.append(s)
        if supervised:
            spans.append((pos, pos + len(s)))
        pos += len(s)

    system_block = _fill(t.system_format.replace("{system}", sys_text), eos, bos) if sys_text else ""
    if not t.system_in_first_user:
        emit(system_block)
    if not turns:
        raise TemplateError("conversation has no turns")
    if t.single_turn and len(turns) > 2:
        raise TemplateError(f"template {t.name!r} renders a single exchange, got {len(turns)} turns")
    for i, turn in enumerate(turns):
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        expect_human = i % 2 == 0
        if role not in HUMAN_ROLES + ASSISTANT_ROLES:
            raise TemplateError(f"turn {i}: unknown role {role!r} (expected human or gpt)")
        if expect_human != (role in HUMAN_ROLES):
            raise TemplateError(
                f"turn {i}: roles out of order (expected {'human' if expect_human else 'gpt'}, got {role!r})"
            )
        if not isinstance(value, str) or not value.strip():
            raise TemplateError(f"turn {i} ({role}): empty or non-text value")
        if expect_human:
            prefix = t.first_user_prefix if (i == 0 and t.first_user_prefix is not None) else t.user_prefix
            text = value
            if t.user_images_only:
                text = IMAGE_PLACEHOLDER * value.count(IMAGE_PLACEHOLDER)
            elif t.image_format:
                wrapped = t.image_format.replace("{image}", IMAGE_PLACEHOLDER)
                text = re.sub(re.escape(IMAGE_PLACEHOLDER) + r"\n?", lambda _: wrapped, text).rstrip(" ")
            if i == 0 and t.system_in_first_user:
                text = system_block + text
            emit(_fill(prefix, eos, bos))
            emit(text)
            emit(_fill(t.user_suffix, eos, bos))
        else:
            emit(_fill(t.assistant_prefix, eos, bos))
            emit(_fill(t.reply_lead, eos, bos))
            emit(value + _fill(t.stop, eos, bos), supervised=True)
            emit(_fill(t.after_stop, eos, bos))
    last_is_human = len(turns) % 2 == 1
    if add_generation_prompt:
        if not last_is_human:
            raise TemplateError("add_generation_prompt needs a conversation that ends with a human turn")
        emit(_fill(t.assistant_prefix, eos, bos))
    elif last_is_human:
        raise TemplateError("conversation ends with a human turn and has no reply to train on")
    return Rendered("".join(parts), spans)
