"""Tokenizers: load any Hugging Face tokenizer, or train a small BPE one offline.

vistune needs two special tokens in every tokenizer: the image placeholder
(`<image>`, one id that preprocessing expands into one id per visual token) and a
real padding token (padding with `unk` or `eos`, as the original LLaVA does, turns
real text into padding).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .templates import IMAGE_PLACEHOLDER

PAD_TOKEN = "<pad>"


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory and make sure it has vistune's specials."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise TypeError(
            f"tokenizer at {path} is not a fast tokenizer; vistune needs character offsets "
            "to derive training labels (install `tokenizers` and save a fast tokenizer)"
        )
    ensure_special_tokens(tok)
    return tok


def ensure_special_tokens(tok: PreTrainedTokenizerBase) -> int:
    """Add `<image>` and a pad token when missing; returns how many tokens were added."""
    added = 0
    if IMAGE_PLACEHOLDER not in tok.get_vocab():
        added += tok.add_special_tokens(
            {"extra_special_tokens": [IMAGE_PLACEHOLDER]}, replace_extra_special_tokens=False
        )
    if tok.pad_token is None:
        added += tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return added


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    tid = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if tid is None or tid == tok.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER} token; call ensure_special_tokens first")
    return tid


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    *,
    extra_special_tokens: Iterable[str] = ("<|im_start|>", "<|im_end|>"),
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline (Llama-style specials: <s>, </s>, <unk>).

    The result behaves like any HF fast tokenizer: BOS is prepended, `</s>` is EOS,
    `<pad>` pads and `<image>` is a single special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", PAD_TOKEN, IMAGE_PLACEHOLDER, *extra_special_tokens]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos_id = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_PLACEHOLDER, *extra_special_tokens],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    return tok
