"""Images: open safely, convert any mode to RGB, fit to a square, normalise.

Settings live in `ImageConfig`, which is saved with every model
(`preprocessor_config.json`), so training and inference always agree.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .grids import default_pinpoints, parse_pinpoints

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A decompression bomb is refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


ASPECTS = ("pad", "resize", "crop", "anyres")


class ImageError(ValueError):
    """An image cannot be used; the message names the file."""


@dataclass
class ImageConfig:
    size: int = 336
    # pad: centre on a square of the mean colour (LLaVA-1.5); resize: squash; crop: centre crop;
    # anyres: tiles of `size` px on the best of `grid_pinpoints` plus the whole image (LLaVA-NeXT, data/anyres.py).
    aspect: str = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS
    grid_pinpoints: list | str | None = None  # anyres: [[width, height], ...] px, or "(1x1),...,(3x3)" tiles
    max_tiles: int | None = None  # anyres: grids of more tiles than this (base tile not counted) are never chosen

    def __post_init__(self) -> None:
        if self.aspect not in ASPECTS:
            raise ValueError(f"image aspect must be one of {', '.join(ASPECTS)}, got {self.aspect!r}")
        if self.aspect == "anyres":
            given = self.grid_pinpoints if self.grid_pinpoints is not None else default_pinpoints(self.size)
            self.grid_pinpoints = [list(p) for p in parse_pinpoints(given, self.size)]
            if self.max_tiles is not None and not self.pinpoints:
                raise ValueError(f"image max_tiles {self.max_tiles} leaves none of the grids {self.grid_pinpoints}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r}; one of {sorted(RESAMPLE)}")
        self.mean = tuple(float(x) for x in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(x) for x in self.std)  # type: ignore[assignment]

    @property
    def pinpoints(self) -> list[tuple[int, int]]:
        """The anyres grids (width, height) that may be chosen: those within ``max_tiles``."""
        grids = [(int(w), int(h)) for w, h in self.grid_pinpoints or []]
        if self.max_tiles is None:
            return grids
        return [(w, h) for w, h in grids if (w // self.size) * (h // self.size) <= self.max_tiles]

    @property
    def fill_color(self) -> tuple[int, int, int]:
        return tuple(int(round(m * 255)) for m in self.mean)  # type: ignore[return-value]

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # Truncated, not rounded: LLaVA's expand2square and transformers' LlavaImageProcessor
        # both pad with int(m * 255), i.e. (122, 116, 104) for CLIP's mean.
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.aspect != "anyres":  # other aspects read like they did before anyres existed
            del d["grid_pinpoints"], d["max_tiles"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def open_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGB; raise ImageError naming the culprit."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except FileNotFoundError:
        raise ImageError(f"image not found: {name}") from None
    except OSError as e:
        raise ImageError(f"cannot read image {name}: {e}") from None
    with fp:
        try:
            with warnings.catch_warnings():
                # PIL warns of large images as it opens them; the pixel limit below refuses them with a clear error
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image {name} has {w}x{h} pixels, over the limit of {max_pixels}")
            img.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"image {name} refused as a decompression bomb: {e}") from None
        except Exception as e:  # PIL raises many types for corrupt files
            # PIL names the file by its reader's repr ("<_io.BufferedReader name=...>"); the path is said already
            why = re.sub(r"\s*<_io\.\w+ name=.*?>", "", str(e)).strip() or type(e).__name__
            raise ImageError(f"cannot decode image {name}: {why}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK...) to RGB; alpha composited on white."""
    img = ImageOps.exif_transpose(img) if hasattr(img, "getexif") else img
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def fit_square(img: Image.Image, cfg: ImageConfig) -> Image.Image:
    w, h = img.size
    resample = RESAMPLE[cfg.resample]
    if cfg.aspect == "pad" and w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), cfg.pad_color)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    elif cfg.aspect == "crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (cfg.size, cfg.size):
        img = img.resize((cfg.size, cfg.size), resample)
    return img


def preprocess(img: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, size, size)."""
    img = fit_square(to_rgb(img), cfg)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def load_pixels(path: str | os.PathLike | bytes, cfg: ImageConfig) -> torch.Tensor:
    return preprocess(open_image(path, cfg.max_pixels), cfg)


def blank_image(cfg: ImageConfig) -> Image.Image:
    """A mean-colour image: what 'no visual information' looks like to the model."""
    return Image.new("RGB", (cfg.size, cfg.size), cfg.fill_color)


def resolve_image_path(name: str, image_dir: str | os.PathLike | None) -> Path:
    p = Path(name)
    if image_dir is not None and not p.is_absolute():
        p = Path(image_dir) / p
    return p
