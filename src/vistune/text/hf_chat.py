"""Prompts rendered with a tokenizer's own Jinja chat template (`apply_chat_template`).

vistune's models carry a vistune template (templates.py); a plain Hugging Face causal LM
served as it is carries its chat template in its tokenizer instead. LLaVA-style turns
(``{"from": "human" | "gpt", "value"}``) become ``{"role", "content"}`` messages for it.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ChatTemplateError(ValueError):
    """A conversation cannot be rendered with the tokenizer's chat template (or it has none)."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_messages(turns: list[dict], system: str | None = None) -> list[dict]:
    """LLaVA turns (and a system text; None: the template's own default) as chat messages."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, t in enumerate(turns):
        who = t.get("from", t.get("role"))
        if who not in ROLES:
            raise ChatTemplateError(f"turn {i}: unknown role {who!r} (expected one of {sorted(ROLES)})")
        messages.append({"role": ROLES[who], "content": str(t.get("value", t.get("content", "")))})
    return messages


def encode_with_chat_template(tokenizer: PreTrainedTokenizerBase, turns: list[dict], system: str | None = None,
                              add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``turns`` as the tokenizer's chat template renders them (with the opening of
    the assistant's reply when ``add_generation_prompt``)."""
    if not has_chat_template(tokenizer):
        raise ChatTemplateError("the tokenizer has no chat_template to render a conversation with")
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(chat_messages(turns, system), add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=True)
    except TemplateError as e:  # a template's own check (roles must alternate, say)
        raise ChatTemplateError(f"the chat template refuses this conversation: {e}") from None
    return list(out["input_ids"])
