"""Training speed-ups that keep the maths: the same loss and gradients for less work.

The trainer switches them on in one place (``for_training``); each one's gain on a step shaped
like llava-v1.5-7b's is measured by benchmarks/speedups.py (docs/benchmarks.md). What stays in
``model/`` is the plain forward they must agree with.

- **The loss at the supervised positions only.** Most of a LLaVA sample (system prompt, question,
  576 image tokens) carries no loss; the plain forward computes the LM head's logits everywhere,
  casts them to fp32 and drops them. Here the head runs where the next token is supervised.
- **The causal mask alone for a right-padded batch.** A real token never attends to the padding
  after it, and padded positions carry no loss, so the mask adds nothing but cost: without it SDPA
  takes its causal kernel, and eager attention gets transformers' causal mask.
"""
from __future__ import annotations

import torch

from ..model.unwrap import unwrap_peft
from ..model.vlm import VisionLanguageModel, VLMOutput, token_loss
from ..text.encode import IGNORE_INDEX

# Configs whose LM post-processes its logits (soft-capping, scaling): the head alone would differ.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Attention whose mask may go: others (flash-attention) read the padding mask to skip the padding.
_CAUSAL_ONLY_ATTENTION = ("eager", "sdpa")


def for_training(model: VisionLanguageModel) -> VisionLanguageModel:
    """The same model (its config, modules and parameters, shared) with the speed-ups' training forward."""
    return TrainingVLM(model.config, model.vision, model.language_model, model.projector, model.connector)


def right_padded(attention_mask: torch.Tensor | None) -> bool:
    """Whether every row of a 2D padding mask is its real tokens, then padding (or none)."""
    return (attention_mask is not None and attention_mask.dim() == 2
            and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()))


class TrainingVLM(VisionLanguageModel):
    """A VisionLanguageModel whose labelled forward takes the speed-ups; any other call is the plain one."""

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, position_ids=None,
                vision_features=None, image_embeds=None, past_key_values=None, use_cache=False,
                image_sizes=None, **lm_kwargs) -> VLMOutput:
        lm = unwrap_peft(self.language_model)
        if (labels is None or past_key_values is not None or use_cache or lm_kwargs
                or any(getattr(lm.config, k, None) for k in _LOGIT_POSTPROCESSING)):
            return super().forward(input_ids, attention_mask, pixel_values, labels, position_ids, vision_features,
                                   image_embeds, past_key_values, use_cache, image_sizes, **lm_kwargs)
        # config._attn_implementation is transformers' only way to read which attention runs.
        if right_padded(attention_mask) and lm.config._attn_implementation in _CAUSAL_ONLY_ATTENTION:
            attention_mask = None
        embeds = self.embed(input_ids, pixel_values, vision_features, image_embeds, image_sizes)
        hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        loss, n = token_loss(lm.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep])
        return VLMOutput(loss=loss, num_supervised=n)
