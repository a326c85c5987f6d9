"""Connectors that compress: a fixed number of learned queries read the tower's features.

LLaVA's projector maps every patch feature to one LLM token; a connector here first
reduces the tower's T features to ``num_queries`` vectors, which the projector then maps
into the LLM, so every image costs ``num_queries`` tokens whatever the tower's grid.

    qformer    BLIP-2's Q-Former (transformers' ``Blip2QFormerModel``): learned query
               tokens self-attend and cross-attend to the features (MiniGPT-4's connector).
               A LayerNorm on the features comes first: BLIP-2's ``ln_vision``, which
               transformers stores as the vision model's ``post_layernorm``.
    resampler  Perceiver-style: learned latents cross-attend to the features, each layer
               attention then a feed-forward block, residual, pre-norm (Flamingo's
               resampler without its time embeddings).

A connector is described by a plain dict (``VLMConfig.connector``), saved in the model's
``config.json``, so a saved model rebuilds it exactly; its weights live under
``connector.*`` in ``model.safetensors``.
"""
from __future__ import annotations

import torch
from torch import nn

CONNECTOR_TYPES = ("qformer", "resampler")


def check_connector(spec: dict) -> None:
    """An empty dict (no connector) or {"type": qformer|resampler, "num_queries": N >= 1, ...}."""
    if not spec:
        return
    kind = spec.get("type")
    if kind not in CONNECTOR_TYPES:
        raise ValueError(f"unknown connector type {kind!r}; expected one of {', '.join(CONNECTOR_TYPES)}")
    n = spec.get("num_queries")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"connector num_queries must be an integer >= 1, got {n!r}")


RESAMPLER_DEFAULTS = {"depth": 2, "heads": 8, "ff_mult": 4}  # hidden_size: the tower's width


def check_options(kind: str, options: dict) -> None:
    """Unknown option keys of a connector are errors that name them."""
    if kind == "qformer":
        from transformers import Blip2QFormerConfig

        known = set(Blip2QFormerConfig().to_dict())
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"connector options {unknown} are not Blip2QFormerConfig keys")
    elif kind == "resampler":
        known = {"hidden_size", *RESAMPLER_DEFAULTS}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"connector options {unknown} are not resampler keys ({', '.join(sorted(known))})")


def connector_spec(kind: str, num_queries: int, vision_dim: int, options: dict | None = None) -> dict:
    """The full description of a new connector over features of width ``vision_dim``.

    ``options`` overrides the defaults: for ``qformer`` any ``Blip2QFormerConfig`` key
    (hidden_size, num_hidden_layers, ...); for ``resampler`` hidden_size, depth, heads,
    ff_mult. Unknown keys are errors.
    """
    options = dict(options or {})
    check_options(kind, options)
    if kind == "qformer":
        from transformers import Blip2QFormerConfig

        qcfg = Blip2QFormerConfig(**{**options, "encoder_hidden_size": vision_dim})
        spec = {"type": kind, "num_queries": num_queries, "qformer": plain_config(qcfg)}
    elif kind == "resampler":
        defaults = {"hidden_size": vision_dim, **RESAMPLER_DEFAULTS}
        spec = {"type": kind, "num_queries": num_queries, "vision_dim": vision_dim, **defaults, **options}
        if spec["hidden_size"] % spec["heads"]:
            raise ValueError(f"resampler hidden_size {spec['hidden_size']} is not divisible by heads {spec['heads']}")
    else:
        raise ValueError(f"unknown connector type {kind!r}; expected one of {', '.join(CONNECTOR_TYPES)}")
    check_connector(spec)
    return spec


def spec_for(kind: str | None, num_queries: int, vision_dim: int, options: dict | None = None) -> dict:
    """The connector a new model gets: none (``kind`` None) or a fresh one."""
    if kind is None:
        if options:
            raise ValueError("connector options given without a connector type")
        return {}
    return connector_spec(kind, num_queries, vision_dim, options)


def plain_config(cfg) -> dict:
    d = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures"):
        d.pop(k, None)
    return d


class QFormerConnector(nn.Module):
    """LayerNorm on the features -> Q-Former with learned queries -> (N, num_queries, hidden)."""

    def __init__(self, spec: dict):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        qd = dict(spec["qformer"])
        qd.pop("model_type", None)
        qcfg = Blip2QFormerConfig(**qd)
        self.num_queries = int(spec["num_queries"])
        self.output_size = int(qcfg.hidden_size)
        self.norm = nn.LayerNorm(qcfg.encoder_hidden_size, eps=float(spec.get("norm_eps", 1e-6)))
        # BLIP-2's initialisation of the queries (LAVIS: normal, std = initializer_range)
        self.query_tokens = nn.Parameter(torch.randn(1, self.num_queries, qcfg.hidden_size) * qcfg.initializer_range)
        self.qformer = Blip2QFormerModel(qcfg)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        feats = self.norm(features.to(self.norm.weight.dtype))
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state


class ResamplerLayer(nn.Module):
    """Latents attend to [features; latents], then a feed-forward block; both residual, pre-norm."""

    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_features = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim))

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_features(features), q], dim=1)  # latents also see each other, as in Flamingo
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


class ResamplerConnector(nn.Module):
    """Perceiver resampler: ``num_queries`` learned latents read the features through ``depth`` layers."""

    def __init__(self, spec: dict):
        super().__init__()
        dim = int(spec["hidden_size"])
        self.num_queries = int(spec["num_queries"])
        self.output_size = dim
        self.input = nn.Linear(int(spec["vision_dim"]), dim)
        self.latents = nn.Parameter(torch.randn(self.num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(
            ResamplerLayer(dim, int(spec["heads"]), int(spec["ff_mult"])) for _ in range(int(spec["depth"])))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.input(features.to(self.input.weight.dtype))
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm(latents)


def build_connector(spec: dict, vision_dim: int) -> nn.Module | None:
    """The connector a spec describes (None for an empty spec), checked against the tower's width."""
    if not spec:
        return None
    check_connector(spec)
    if spec["type"] == "qformer":
        width = spec["qformer"].get("encoder_hidden_size")
        module: nn.Module = QFormerConnector(spec)
    else:
        width = spec.get("vision_dim")
        module = ResamplerConnector(spec)
    if width != vision_dim:
        raise ValueError(f"the {spec['type']} connector reads features of width {width}, "
                         f"but the vision tower gives {vision_dim}")
    return module
