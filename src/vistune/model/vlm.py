"""The vision-language model: vision tower -> projector -> spliced into the LM.

Preprocessing has already expanded every `<image>` into ``num_image_tokens`` copies
of the image token id, so sequence lengths are known before the model runs. The
model only replaces the embeddings at those positions, in order, with the
projected features of the batch's images (images of sample 0 first, then sample 1...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..text.encode import IGNORE_INDEX
from . import anyres
from .config import VLMConfig
from .connectors import build_connector
from .projector import build_projector
from .unwrap import unwrap_peft
from .vision import VisionTower


class ImageTokenMismatch(ValueError):
    """The image placeholders of a batch and its image features disagree."""


@dataclass
class VLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    num_supervised: int = 0


class VisionLanguageModel(nn.Module):
    """Vision tower, projector and causal LM; the forward is the plain one, logits at every position
    (training runs an equivalent with less work: vistune.train.speedups)."""

    def __init__(self, config: VLMConfig, vision: VisionTower, language_model: PreTrainedModel,
                 projector: nn.Module | None = None, connector: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.language_model = language_model
        text_dim = language_model.get_input_embeddings().embedding_dim
        # Between tower and projector: a Q-Former or resampler (config.connector), or nothing.
        self.connector = connector if connector is not None else build_connector(config.connector, vision.hidden_size)
        width = vision.hidden_size if self.connector is None else self.connector.output_size
        self.projector = projector if projector is not None else build_projector(
            config.projector_type, width, text_dim
        )
        if config.image.aspect == "anyres":
            anyres.add_newline(self.projector, text_dim)

    # -- pieces ---------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """Tower features -> visual tokens in the LLM's space (through the connector, if any)."""
        if self.connector is not None:
            vision_features = self.connector(vision_features)
        p = next(self.projector.parameters(), None)
        if p is not None:
            vision_features = vision_features.to(dtype=p.dtype, device=p.device)
        return self.projector(vision_features)

    def encode_images(self, pixel_values: torch.Tensor,
                      image_sizes: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """(N, 3, H, W) pixels -> (N, T, text_dim) visual tokens. AnyRes: the tiles of images of
        ``image_sizes`` (width, height) -> one (T_i, text_dim) tensor per image (`model.anyres`)."""
        return self.encode_features(self.vision(pixel_values), image_sizes)

    def encode_features(self, vision_features: torch.Tensor,
                        image_sizes: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """The tower's (N, T, C) features (computed, or read from the feature cache) -> visual tokens,
        as `encode_images`."""
        feats = self.project(vision_features)
        if image_sizes is None:
            return feats
        return anyres.merge_images(feats, image_sizes, self.config.image, anyres.newline_of(self.projector))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_embeds: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the images spliced in at the image-token positions.

        Images come as pixels (anyres: tiles, with ``image_sizes``), as cached vision-tower
        features (before the projector), or as already projected embeddings, (N, T, D) or one
        (T_i, D) per image (inference reuses them across turns). A count mismatch is an error,
        never a silent truncation.
        """
        emb_layer = self.language_model.get_input_embeddings()
        is_image = input_ids == self.image_token_id
        safe_ids = input_ids.masked_fill(is_image, 0)
        embeds = emb_layer(safe_ids)
        if image_embeds is None:
            if pixel_values is not None:
                image_embeds = self.encode_images(pixel_values, image_sizes)
            elif vision_features is not None:
                image_embeds = self.encode_features(vision_features, image_sizes)
        n_images = 0 if image_embeds is None else len(image_embeds)
        if isinstance(image_embeds, (list, tuple)):
            image_embeds = torch.cat(list(image_embeds)) if image_embeds else None
        n_slots = int(is_image.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[:-1].numel()
        if n_slots != n_feats:
            raise ImageTokenMismatch(
                f"batch has {n_slots} image-token positions but {n_feats} image feature vectors "
                f"({n_images} images)"
            )
        if image_embeds is None:
            return embeds
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    # -- forward --------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_embeds: torch.Tensor | list[torch.Tensor] | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        image_sizes: torch.Tensor | None = None,
        **lm_kwargs,
    ) -> VLMOutput:
        embeds = self.embed(input_ids, pixel_values, vision_features, image_embeds, image_sizes)
        if past_key_values is not None:
            lm_kwargs[self.cache_kwarg()] = past_key_values
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **lm_kwargs,
        )
        loss, n = (None, 0)
        if labels is not None:
            loss, n = causal_lm_loss(out.logits, labels)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return VLMOutput(loss, out.logits, cache, n)

    def cache_kwarg(self) -> str:
        """The name of the LM's keyword argument for its KV cache."""
        # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
        import inspect

        if not hasattr(self, "_cache_arg_name"):
            params = inspect.signature(unwrap_peft(self.language_model).forward).parameters
            self._cache_arg_name = "cache" if "cache" in params else "past_key_values"
        return self._cache_arg_name


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over supervised positions, and how many there are."""
    return token_loss(logits[:, :-1], labels[:, 1:])


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of (..., vocab) logits against targets; IGNORE_INDEX targets skipped."""
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / max(n, 1)
    return loss, n
