from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.model.build import build_vlm
from vistune.model.tiny import tiny_text_config, tiny_vision_config
from vistune.text.tokenizer import train_bpe_tokenizer

WORDS = ("red green blue yellow circle square triangle left right top bottom small large "
         "the a is are there what color shape how many objects image picture describe in of on "
         "yes no one two three four five answer question this object left side").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(corpus(), vocab_size=400)


def make_model(tokenizer, vision="clip", text="llama", projector="mlp2x_gelu", template="vicuna_v1", seed=0, **kw):
    torch.manual_seed(seed)
    model, tok = build_vlm(
        tiny_vision_config(vision), tiny_text_config(text, vocab_size=len(tokenizer)), tokenizer,
        projector_type=projector, template=template, **kw,
    )
    return model.eval(), tok


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(tokenizer)


def solid_image(color=(255, 0, 0), size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise_image(seed=0, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_causal_lm_dir(tokenizer, path, seed=0, chat_template: str | None = CHATML_JINJA, context: int = 4096):
    """A plain Hugging Face causal LM directory (what a user brings for `vistune serve`): a tiny
    random LlamaForCausalLM in safetensors and the trained tokenizer with a ChatML chat template,
    ending a reply with <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))  # a copy: the session's tokenizer stays as it is
    tok.eos_token = "<|im_end|>"
    tok.chat_template = chat_template
    tok.model_max_length = context
    tok.save_pretrained(str(path))
    cfg = {k: v for k, v in tiny_text_config("llama", vocab_size=len(tok), max_positions=context).items() if k != "model_type"}
    lm = AutoModelForCausalLM.from_config(LlamaConfig(**cfg, eos_token_id=tok.eos_token_id,
                                                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    lm.save_pretrained(str(path))
    return path
