"""The typed configuration of a vistune model, as saved in its `config.json`."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..data.images import ImageConfig
from ..data.settings import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE
from .connectors import check_connector

CONFIG_NAME = "config.json"
# 2: anyres images and connectors, which a reader of 1 would misread (it drops fields it does not know).
FORMAT_VERSION = 2
PROJECTOR_TYPES = "linear, identity, mlp{N}x_gelu"
MLP_PROJECTOR_RE = re.compile(r"^mlp(\d+)x_gelu$")


def check_projector_type(name: str) -> None:
    if name in ("linear", "identity") or MLP_PROJECTOR_RE.match(name):
        return
    raise ValueError(f"unknown projector type {name!r}; expected one of {PROJECTOR_TYPES}")


@dataclass
class VLMConfig:
    """Everything needed to rebuild a model from its directory.

    ``vision`` and ``text`` are the Hugging Face config dicts of the vision tower and
    the causal LM (each with its ``model_type``), so any HF architecture fits.
    """

    vision: dict
    text: dict
    projector_type: str = "mlp2x_gelu"
    # A compressing connector between tower and projector ({"type": "qformer", "num_queries": 32, ...},
    # see model/connectors.py); empty: none, the projector reads every patch feature.
    connector: dict = field(default_factory=dict)
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"  # patch: drop CLS; cls_patch: keep it
    num_image_tokens: int = 0
    image_token_id: int = -1
    template: str | dict = DEFAULT_TEMPLATE
    image: ImageConfig = field(default_factory=ImageConfig)
    max_length: int = DEFAULT_MAX_LENGTH
    vistune_version: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_projector_type(self.projector_type)
        check_connector(self.connector or {})
        if self.vision_feature_select not in ("patch", "cls_patch"):
            raise ValueError(
                f"vision_feature_select must be 'patch' or 'cls_patch', got {self.vision_feature_select!r}"
            )
        if isinstance(self.image, dict):
            self.image = ImageConfig.from_dict(self.image)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image"] = self.image.to_dict()
        d["format_version"] = self.needed_format_version()
        return d

    def needed_format_version(self) -> int:
        """The oldest format that holds this model: older vistunes keep reading what they can."""
        return 2 if self.connector or self.image.aspect == "anyres" else 1

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        fv = d.get("format_version", FORMAT_VERSION)
        if fv > FORMAT_VERSION:
            raise ValueError(
                f"model directory uses format version {fv}; this vistune reads up to {FORMAT_VERSION} (upgrade vistune)"
            )
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
