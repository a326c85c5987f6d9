"""AnyRes grid arithmetic (LLaVA-NeXT): which grid of tiles fits an image, and what unpadding keeps.

Pure arithmetic on sizes, no pixels: the data side (`vistune.data.anyres`) and the model side
(`vistune.model.anyres`) both follow it, so the token count known in preprocessing is the one
the model produces. Sizes are (width, height), as in LLaVA-NeXT's own code.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

_RANGE = re.compile(r"\((\d+)x(\d+)\)")


def parse_pinpoints(pinpoints: str | Sequence[Sequence[int]], tile: int) -> list[tuple[int, int]]:
    """``[[w, h], ...]`` in pixels, or LLaVA-NeXT's range ``"(1x1),...,(3x3)"`` in tiles (every grid from
    the first to the last, columns x rows), as a list of (width, height); each a multiple of ``tile``."""
    if isinstance(pinpoints, str):
        found = _RANGE.findall(pinpoints)
        if not found:
            raise ValueError(f"image_grid_pinpoints {pinpoints!r}: expected a list of [width, height] or a range "
                             "such as '(1x1),...,(3x3)'")
        (c0, r0), (c1, r1) = (tuple(map(int, found[0])), tuple(map(int, found[-1])))
        out = [(c * tile, r * tile) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1)]
    else:
        out = []
        for p in pinpoints:
            if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p)):
                raise ValueError(f"image_grid_pinpoints: {p!r} is not a [width, height] pair of integers")
            out.append((int(p[0]), int(p[1])))
    if not out:
        raise ValueError("image_grid_pinpoints is empty")
    for w, h in out:
        if w <= 0 or h <= 0 or w % tile or h % tile:
            raise ValueError(f"image_grid_pinpoints: [{w}, {h}] is not a positive multiple of the tile size {tile}")
    return out


def default_pinpoints(tile: int) -> list[tuple[int, int]]:
    """LLaVA-1.6's grids (2x1, 1x2, 2x2, 3x1, 1x3 tiles) at this tile size."""
    return [(tile, 2 * tile), (2 * tile, tile), (2 * tile, 2 * tile), (3 * tile, tile), (tile, 3 * tile)]


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) of ``pinpoints`` that keeps most of a ``size`` (width, height) image's pixels,
    then wastes the least canvas; the first such in the list on a tie."""
    ow, oh = size
    best, best_eff, best_waste = None, -1, math.inf
    for w, h in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    assert best is not None
    return best


def unpadded_shape(size: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """(rows, columns) of a ``rows`` x ``cols`` feature map of a padded ``size`` (width, height) image
    once the rows or columns that only saw padding are cropped, as transformers' LLaVA-NeXT does."""
    ow, oh = size
    if ow / oh > cols / rows:  # wider than the grid: padding above and below
        new = int(round(oh * (cols / ow), 7))
        rows -= 2 * ((rows - new) // 2)
    else:
        new = int(round(ow * (rows / oh), 7))
        cols -= 2 * ((cols - new) // 2)
    return rows, cols


def feature_side(tile_tokens: int) -> int:
    """The side of a tile's square feature map."""
    side = math.isqrt(tile_tokens)
    if side * side != tile_tokens:
        raise ValueError(f"anyres needs a square map of features per tile; the tower gives {tile_tokens} tokens "
                         "(with vision_feature_select cls_patch the CLS token is one too many: use patch)")
    return side
