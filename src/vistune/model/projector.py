"""The projector W: vision features -> LLM embedding space."""
from __future__ import annotations

from torch import nn

from .config import MLP_PROJECTOR_RE, check_projector_type


def build_projector(kind: str, vision_dim: int, text_dim: int) -> nn.Module:
    """`linear`, `identity`, or `mlp{N}x_gelu` (N Linear layers with GELU between).

    Module layout matches the original LLaVA (`Linear` or `Sequential` with Linear at
    0, 2, 4...), so its `mm_projector.*` keys map one to one.
    """
    check_projector_type(kind)
    if kind == "linear":
        return nn.Linear(vision_dim, text_dim)
    if kind == "identity":
        if vision_dim != text_dim:
            raise ValueError(f"identity projector needs equal widths, got {vision_dim} and {text_dim}")
        return nn.Identity()
    depth = int(MLP_PROJECTOR_RE.match(kind).group(1))  # type: ignore[union-attr]
    layers: list[nn.Module] = [nn.Linear(vision_dim, text_dim)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
    return nn.Sequential(*layers)
