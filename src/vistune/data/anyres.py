"""AnyRes (LLaVA-NeXT): an image as a grid of tower-sized tiles plus the whole image, and its token count.

From a list of grid resolutions (``grid_pinpoints``, each ``[width, height]`` as in LLaVA-NeXT's
own code), the one that best fits the image is chosen: the most of the image's pixels kept
(effective resolution), then the least canvas left empty (wasted resolution). The image is
resized into it keeping its aspect, padded with black to fill it, and cut into tiles of the
tower's size, row by row; the whole image squashed to one tile goes first (the base tile).

The model puts the tiles' features back in place, crops away the rows or columns that only
saw padding, and appends a learned newline embedding after each row (`vistune.model.anyres`).
How many tokens that makes is known from the image's size alone (`anyres_token_count`), so
each ``<image>`` is expanded to its own count in preprocessing.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .grids import default_pinpoints, feature_side, parse_pinpoints, select_best_resolution, unpadded_shape
from .images import DEFAULT_MAX_PIXELS, RESAMPLE, ImageConfig, ImageError, to_rgb

__all__ = ["Tiles", "anyres_max_tokens", "anyres_token_count", "default_pinpoints", "feature_side", "grid_shape", "image_size",
           "parse_pinpoints", "resize_and_pad", "select_best_resolution", "tile_image", "unpadded_shape"]


def grid_shape(size: tuple[int, int], cfg: ImageConfig) -> tuple[int, int]:
    """(columns, rows) of tiles an image of ``size`` (width, height) is cut into."""
    w, h = select_best_resolution(size, cfg.pinpoints)
    return w // cfg.size, h // cfg.size


def anyres_token_count(size: tuple[int, int], cfg: ImageConfig, tile_tokens: int) -> int:
    """Visual tokens of one ``size`` (width, height) image: the base tile's ``tile_tokens``, then the
    unpadded grid's rows, each with its newline."""
    side = feature_side(tile_tokens)
    gc, gr = grid_shape(size, cfg)
    rows, cols = unpadded_shape(size, gr * side, gc * side)
    return tile_tokens + rows * (cols + 1)


def anyres_max_tokens(cfg: ImageConfig, tile_tokens: int) -> int:
    """The most visual tokens any one image can take: its largest grid, nothing unpadded."""
    side = feature_side(tile_tokens)
    return max(tile_tokens + (h // cfg.size) * side * ((w // cfg.size) * side + 1) for w, h in cfg.pinpoints)


def resize_and_pad(img: Image.Image, target: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """``img`` resized to fit ``target`` (width, height) keeping its aspect, centred on black."""
    ow, oh = img.size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nw, nh = min(math.ceil(ow * sh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), RESAMPLE[resample]), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def _normalise(img: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


@dataclass(frozen=True)
class Tiles:
    """An image ready for an anyres model: the base tile then the grid's tiles row by row, normalised
    ((1 + columns x rows, 3, S, S)), and the image's (width, height)."""

    pixels: torch.Tensor
    size: tuple[int, int]


def tile_image(img: Image.Image, cfg: ImageConfig) -> Tiles:
    img = to_rgb(img)
    s = cfg.size
    target = select_best_resolution(img.size, cfg.pinpoints)
    padded = resize_and_pad(img, target, cfg.resample)
    tiles = [img.resize((s, s), RESAMPLE[cfg.resample])]
    for top in range(0, target[1], s):
        for left in range(0, target[0], s):
            tiles.append(padded.crop((left, top, left + s, top + s)))
    return Tiles(torch.stack([_normalise(t, cfg) for t in tiles]), img.size)


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """An image file's (width, height) as `open_image` will give it (EXIF rotation applied), read from
    its header alone."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112) if hasattr(im, "getexif") else None
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise ImageError(f"cannot read image {path}: {e}") from None
    if w * h > max_pixels:
        raise ImageError(f"image {path} has {w}x{h} pixels, over the limit of {max_pixels}")
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
