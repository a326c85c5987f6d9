"""The vision tower: any Hugging Face vision model, features from a chosen layer."""
from __future__ import annotations

import threading

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .unwrap import unwrap_peft


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
    vcfg = _vision_part(config)
    cls = AutoModel._model_mapping[type(vcfg)]  # e.g. CLIPVisionModel for a whole CLIP checkpoint
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(source, **kwargs)


class _FeaturesReady(Exception):
    """Carries the chosen layer's hidden states out of the encoder, past the layers after it."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _hidden_state_layers(model: nn.Module) -> tuple[list[nn.Module], int] | None:
    """The modules whose outputs are the model's ``hidden_states`` [1:], in order, and the output index.

    Read from the model's own ``_can_record_outputs`` (transformers records
    ``hidden_states[i]``, i >= 1, as the output of the i-th such layer and
    ``hidden_states[0]`` as the first one's input). Only the plain case is accepted:
    one class, exactly ``num_hidden_layers`` instances, all held in order by one
    ModuleList (an encoder loops over it). None otherwise: no skipping.
    """
    try:  # transformers' own hidden-state bookkeeping (5.x); without it, no skipping
        from transformers.utils.output_capturing import OutputRecorder
    except ImportError:
        return None

    base = unwrap_peft(model)  # a peft-wrapped tower
    spec = (getattr(type(base), "_can_record_outputs", None) or {}).get("hidden_states")
    if isinstance(spec, type):
        cls, index = spec, 0
    elif (isinstance(spec, OutputRecorder) and isinstance(spec.target_class, type) and spec.layer_name is None
          and spec.class_name is None and spec.capture_initial_hidden_state):
        cls, index = spec.target_class, spec.index
    else:
        return None
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    layers = [m for m in base.modules() if isinstance(m, cls)]
    if not n or len(layers) != n:
        return None
    if not any(isinstance(m, nn.ModuleList) and len(m) == n and all(a is b for a, b in zip(m, layers))
               for m in base.modules()):
        return None
    return layers, index


def _sharded(model: nn.Module) -> bool:
    """FSDP / DeepSpeed ZeRO-3 gather and free weights in module hooks that an early exit would cut short."""
    return (any(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in model.modules())
            or any(hasattr(p, "ds_id") for p in model.parameters()))


class VisionTower(nn.Module):
    """Wraps an HF vision model; returns (num_images, tokens, width) features.

    Transformer encoders give hidden states (B, T, D); convolutional ones give maps
    (B, C, H, W), flattened into H*W tokens. ``select='patch'`` drops the CLS token
    when the encoder has one. Convolutional configs carry no input size, so
    ``image_size`` (from the checkpoint's preprocessor_config.json) says which
    resolution the token count and width are probed at.

    Layers after ``feature_layer`` are not run (LLaVA-1.5 reads layer -2: its
    tower's last layer is wasted work otherwise). The forward stops at the chosen
    layer: a hook on the layer whose output is that hidden state, installed for one
    forward and removed after it, raises with it (see ``_hidden``). The modules, the
    weights and what is saved or exported stay the full tower. Done only where the
    model's own hidden-state bookkeeping says which layer that is (ViT-style
    encoders: CLIP, SigLIP, ...), checked once against the full forward at the
    first probe; ``skip_unused_layers = False`` turns it off.
    """

    skip_unused_layers: bool = True

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

    def _raw_token_count(self) -> int:
        return self._probe()[0]

    @property
    def has_cls(self) -> bool:
        patch = getattr(self.model.config, "patch_size", None)
        if not patch:
            return False
        return self._raw_token_count() == (self.image_size // int(patch)) ** 2 + 1

    def _exit_point(self) -> tuple[nn.Module, int, bool] | None:
        """(layer, output index, hook the layer's input?) where ``feature_layer``'s state is ready, if
        layers follow it."""
        found = _hidden_state_layers(self.model)
        if found is None:
            return None
        layers, index = found
        n_states = len(layers) + 1
        if not -n_states <= self.feature_layer < n_states:
            return None  # the full forward raises the IndexError
        i = self.feature_layer % n_states
        if i == len(layers):
            return None  # the last layer: nothing to skip
        if i == 0:
            return layers[0], 0, True  # hidden_states[0] is the first layer's input
        return layers[i - 1], index, False

    def _full_hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]

    def _early_hidden(self, pixel_values: torch.Tensor, point: tuple[nn.Module, int, bool]) -> torch.Tensor:
        layer, index, on_input = point
        owner = threading.get_ident()  # a forward in another thread on the same model runs on untouched

        def grab(_module, args, kwargs, output=None):
            if threading.get_ident() != owner:
                return None
            if on_input:
                raise _FeaturesReady(args[0] if args else kwargs["hidden_states"])
            raise _FeaturesReady(output[index] if isinstance(output, (tuple, list)) else output)

        if on_input:
            handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        else:
            handle = layer.register_forward_hook(grab, with_kwargs=True)
        try:
            self.model(pixel_values=pixel_values)
        except _FeaturesReady as ready:
            return ready.hidden
        finally:
            handle.remove()
        raise RuntimeError(f"vision tower: layer for feature_layer={self.feature_layer} never ran")

    def _skip_point(self) -> tuple[nn.Module, int, bool] | None:
        """Where to stop, once checked bit-for-bit against the full forward (at the first probe)."""
        if not self.skip_unused_layers or _sharded(self.model):
            return None
        # checked again when the model object (peft wrapping, merging) or the layer changes
        key = (id(self.model), self.feature_layer)
        checked = getattr(self, "_skip_checked", None)
        if checked is None or checked[0] != key:
            point = self._exit_point()
            if point is not None:
                with torch.no_grad():
                    x = self.dummy_pixels()
                    same = torch.equal(self._early_hidden(x, point), self._full_hidden(x))
                point = point if same else None
            self._skip_checked = checked = (key, point)
        return checked[1]

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        point = self._skip_point()
        hs = self._early_hidden(pixel_values, point) if point is not None else self._full_hidden(pixel_values)
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
        return self._raw_token_count() - int(self.select == "patch" and self.has_cls)
