"""AnyRes on the model side (LLaVA-NeXT's spatial_unpad): tiles' features back in place, unpadded, with newlines.

Each image arrives as its base tile then its grid's tiles row by row (`vistune.data.anyres`).
All tiles go through the tower and projector together; per image, the grid's feature maps
are laid side by side into one map, the rows or columns that only saw padding are cropped
off, a learned ``image_newline`` embedding closes each row, and the base tile's features go
first. The grid, and so the token count, follows from the image's size alone.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.anyres import feature_side, grid_shape, unpadded_shape
from ..data.images import ImageConfig

NEWLINE = "image_newline"


def add_newline(projector: nn.Module, width: int) -> None:
    """Give the projector the learned row-end embedding: it trains, saves and loads with the projector
    (``projector.image_newline``), initialised as LLaVA-NeXT does (normal, std 1/sqrt(width))."""
    if not hasattr(projector, NEWLINE):
        projector.register_parameter(NEWLINE, nn.Parameter(torch.randn(width) / math.sqrt(width)))


def newline_of(projector: nn.Module) -> torch.Tensor:
    return getattr(projector, NEWLINE)


def tiles_per_image(sizes: torch.Tensor | list, cfg: ImageConfig) -> list[int]:
    """How many tiles (base tile included) each (width, height) image was cut into."""
    out = []
    for w, h in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes):
        cols, rows = grid_shape((int(w), int(h)), cfg)
        out.append(1 + cols * rows)
    return out


def merge_tiles(feats: torch.Tensor, size: tuple[int, int], cfg: ImageConfig, newline: torch.Tensor) -> torch.Tensor:
    """One image's (1 + tiles, side^2, D) projected features -> (tokens, D) as the text sees them."""
    side = feature_side(feats.shape[1])
    cols, rows = grid_shape(size, cfg)
    if feats.shape[0] != 1 + cols * rows:
        raise ValueError(f"image of size {size} needs {1 + cols * rows} tiles, got {feats.shape[0]}")
    d = feats.shape[-1]
    grid = feats[1:].view(rows, cols, side, side, d).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
    keep_r, keep_c = unpadded_shape(size, rows * side, cols * side)
    top, left = (rows * side - keep_r) // 2, (cols * side - keep_c) // 2
    grid = grid[top:top + keep_r, left:left + keep_c]
    ends = newline.to(grid.dtype).expand(keep_r, 1, d)
    return torch.cat([feats[0], torch.cat([grid, ends], 1).flatten(0, 1)])


def merge_images(feats: torch.Tensor, sizes: torch.Tensor | list, cfg: ImageConfig,
                 newline: torch.Tensor) -> list[torch.Tensor]:
    """Every image's tokens, from the (all tiles, side^2, D) features of a batch's images in order."""
    counts = tiles_per_image(sizes, cfg)
    if sum(counts) != feats.shape[0]:
        raise ValueError(f"{len(counts)} image(s) of sizes {sizes if isinstance(sizes, list) else sizes.tolist()} "
                         f"need {sum(counts)} tiles, got {feats.shape[0]}")
    size_list = sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes
    return [merge_tiles(f, (int(s[0]), int(s[1])), cfg, newline)
            for f, s in zip(feats.split(counts), size_list)]
