"""The vision tower: any Hugging Face vision model, features from a chosen layer."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel


def vision_config_from_dict(d: dict) -> PretrainedConfig:
    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("vision config needs a 'model_type' (e.g. clip_vision_model, siglip_vision_model)")
    return AutoConfig.for_model(model_type, **d)


def _vision_part(config: PretrainedConfig) -> PretrainedConfig:
    # Composite checkpoints (a whole CLIP or SigLIP with its text tower) carry the
    # vision half as `vision_config`.
    return getattr(config, "vision_config", None) or config


def load_vision_model(source: str | dict | PretrainedConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A vision model from a local checkpoint directory or from a config (random init)."""
    if isinstance(source, dict):
        return AutoModel.from_config(vision_config_from_dict(source))
    if isinstance(source, PretrainedConfig):
        return AutoModel.from_config(_vision_part(source))
    config = AutoConfig.from_pretrained(source)
    if config.model_type == "blip-2":  # its tower's weights sit under vision_model.*
        from .blip2 import load_blip2_vision

        return load_blip2_vision(source, dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    # The vision half's config picks its class (CLIPVisionModel for a whole CLIP checkpoint),
    # which reads its own weights from the checkpoint.
    return AutoModel.from_pretrained(source, config=_vision_part(config), **kwargs)


class VisionTower(nn.Module):
    """Wraps an HF vision model; returns (num_images, tokens, width) features.

    Transformer encoders give hidden states (B, T, D); convolutional ones give maps
    (B, C, H, W), flattened into H*W tokens. ``select='patch'`` drops the CLS token
    when the encoder has one. Convolutional configs carry no input size, so
    ``image_size`` (from the checkpoint's preprocessor_config.json) says which
    resolution the token count and width are probed at.
    """

    def __init__(self, model: PreTrainedModel, feature_layer: int = -2, select: str = "patch",
                 image_size: int | None = None):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.select = select
        cfg = model.config
        self.image_size = int(getattr(cfg, "image_size", None) or image_size or 224)
        self.num_channels = int(getattr(cfg, "num_channels", 3))

    @property
    def hidden_size(self) -> int:
        """Width of the features at the chosen layer (stages of a conv net differ in width)."""
        return self._probe()[1]

    def dummy_pixels(self, n: int = 1) -> torch.Tensor:
        p = next(self.model.parameters())
        return torch.zeros(n, self.num_channels, self.image_size, self.image_size, dtype=p.dtype, device=p.device)

    def _probe(self) -> tuple[int, int]:
        """(tokens per image, width) at the feature layer: one dummy forward, cached."""
        if not hasattr(self, "_probed"):
            with torch.no_grad():
                shape = self._hidden(self.dummy_pixels()).shape
            self._probed = (int(shape[1]), int(shape[2]))
        return self._probed

    @property
    def has_cls(self) -> bool:
        patch = getattr(self.model.config, "patch_size", None)
        if not patch:
            return False
        return self._probe()[0] == (self.image_size // int(patch)) ** 2 + 1

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The whole encoder runs, as in transformers' LLaVA: the layers after the feature layer
        # are a small share of a step (measured: docs/benchmarks.md).
        hs = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        if hs.dim() == 4:  # conv feature map
            hs = hs.flatten(2).transpose(1, 2)
        return hs

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trainable = any(p.requires_grad for p in self.model.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            p = next(self.model.parameters())
            hs = self._hidden(pixel_values.to(device=p.device, dtype=p.dtype))
        if self.select == "patch" and self.has_cls:
            hs = hs[:, 1:]
        return hs

    def num_tokens(self) -> int:
        """Visual tokens per image after the patch / cls_patch selection."""
        return self._probe()[0] - int(self.select == "patch" and self.has_cls)
