"""A synthetic image world: coloured shapes on a plain background.

Each scene holds one to four objects, each a distinct (colour, shape) pair with a
size, at positions that may overlap a little. The annotations are exact, so the
rules backend can write instruction data whose every answer is true, and the demo
can grade answers on held-out scenes.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .annotations import Box, ImageAnnotation, save_annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 55, 185),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
BACKGROUND = (205, 205, 205)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    small_px: tuple[int, int] = (12, 15)
    large_px: tuple[int, int] = (20, 25)
    max_overlap: float = 0.15  # largest allowed intersection over the smaller box
    background_noise: int = 6

    def __post_init__(self) -> None:
        pairs = len(COLORS) * len(SHAPES)
        if not 1 <= self.min_objects <= self.max_objects <= pairs:
            raise ValueError(f"objects per scene: need 1 <= min_objects ({self.min_objects}) <= max_objects "
                             f"({self.max_objects}) <= {pairs}, the distinct (colour, shape) pairs")
        if self.image_size < self.large_px[1] + 2:
            raise ValueError(f"image_size {self.image_size} px is too small for objects of up to "
                             f"{self.large_px[1]} px")

    @classmethod
    def sized(cls, image_size: int, **kw) -> "WorldConfig":
        """The default world drawn at ``image_size`` px, its objects scaled with it (defined at 64 px)."""
        if image_size < 32:
            raise ValueError(f"image_size {image_size} px: at least 32")
        scale = image_size / 64

        def px(lo_hi: tuple[int, int]) -> tuple[int, int]:
            return round(lo_hi[0] * scale), round(lo_hi[1] * scale)

        return cls(image_size=image_size, small_px=px(cls.small_px), large_px=px(cls.large_px), **kw)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller else 0.0


def sample_scene(rng: random.Random, cfg: WorldConfig) -> list[Box]:
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    boxes: list[Box] = []
    for color, shape in pairs:
        for _ in range(200):
            size = rng.choice(SIZES)
            lo, hi = cfg.small_px if size == "small" else cfg.large_px
            side = rng.randint(lo, hi)
            x1 = rng.randint(1, cfg.image_size - side - 1)
            y1 = rng.randint(1, cfg.image_size - side - 1)
            bbox = (float(x1), float(y1), float(x1 + side), float(y1 + side))
            if all(_overlap(bbox, b.bbox) <= cfg.max_overlap for b in boxes):
                boxes.append(Box(shape, bbox, {"color": color, "shape": shape, "size": size}))
                break
    return boxes


def draw_scene(boxes: list[Box], cfg: WorldConfig, rng: random.Random) -> Image.Image:
    n = cfg.background_noise
    base = np.full((cfg.image_size, cfg.image_size, 3), BACKGROUND, dtype=np.int16)
    if n:
        noise = np.random.default_rng(rng.getrandbits(32)).integers(-n, n + 1, (cfg.image_size, cfg.image_size, 1))
        base = base + noise
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for b in boxes:
        x1, y1, x2, y2 = b.bbox
        fill = COLORS[b.attributes["color"]]
        shape = b.attributes["shape"]
        if shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape == "triangle":
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
        elif shape == "diamond":
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            draw.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], fill=fill)
    return img


# -- language about scenes ------------------------------------------------------
def name(b: Box, with_size: bool = False) -> str:
    a = b.attributes
    return f"{a['size'] + ' ' if with_size else ''}{a['color']} {a['shape']}"


def phrasings(b: Box, with_size: bool = False) -> tuple[str, ...]:
    """Every way captions and descriptions name the object: "red circle", "circle in red",
    "circle colored red" (with the size in front if asked)."""
    a = b.attributes
    size = a["size"] + " " if with_size else ""
    c, s = a["color"], a["shape"]
    return f"{size}{c} {s}", f"{size}{s} in {c}", f"{size}{s} colored {c}"


def phrase(b: Box, rng: random.Random, with_size: bool = False) -> str:
    """One of `phrasings`, drawn at random: the colour before or after the shape.

    Text that always says the colour first only ever asks a model to find an object by its colour
    and then name its shape. The reverse lookup (the colour of the circle) and the conjunction
    behind "is there a red circle?" then never formed in the demo's LM.
    """
    return rng.choice(phrasings(b, with_size))


def horizontal(b: Box, width: int) -> str:
    cx = b.center[0] / width
    return "left" if cx < 0.4 else "right" if cx > 0.6 else "center"


def vertical(b: Box, height: int) -> str:
    cy = b.center[1] / height
    return "top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle"


def location_phrase(b: Box, w: int, h: int) -> str:
    hz, vt = horizontal(b, w), vertical(b, h)
    if hz == "center" and vt == "middle":
        return "in the center"
    if hz == "center":
        return f"at the {vt}"
    if vt == "middle":
        return f"on the {hz}"
    return f"in the {vt} {hz}"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions_for(boxes: list[Box], w: int, h: int, rng: random.Random, k: int = 4) -> list[str]:
    # Objects are named left to right, as people read a picture: a caption then says
    # which object comes next, and a model can learn to look for it.
    boxes = sorted(boxes, key=lambda b: b.center)
    n = len(boxes)
    objs = [f"a {phrase(b, rng)}" for b in boxes]
    sized = [f"a {phrase(b, rng, True)}" for b in boxes]
    placed = [f"a {phrase(b, rng)} {location_phrase(b, w, h)}" for b in boxes]
    noun = "shape" if n == 1 else "shapes"
    options = [
        f"{_join(objs).capitalize()}.",
        f"{_join(sized).capitalize()} on a gray background.",
        f"{number_word(n).capitalize()} {noun}: {_join(objs)}.",
        f"{_join(placed).capitalize()}.",
        f"A gray picture with {_join(sized)}.",
        f"There {'is' if n == 1 else 'are'} {_join(placed)}.",
    ]
    rng.shuffle(options)
    return options[:k]


def make_world(out_dir: str | os.PathLike, n_images: int, seed: int, cfg: WorldConfig | None = None,
               prefix: str = "", progress: bool = False) -> list[ImageAnnotation]:
    """Write ``n_images`` scenes (PNG) and `annotations.json` into ``out_dir``."""
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    anns: list[ImageAnnotation] = []
    it = range(n_images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synth scenes", unit="img", leave=False)
    for i in it:
        boxes = sample_scene(rng, cfg)
        img = draw_scene(boxes, cfg, rng)
        image_id = f"{prefix}{seed}-{i:06d}"
        file = f"images/{image_id}.png"
        img.save(out / file)
        caps = captions_for(boxes, cfg.image_size, cfg.image_size, rng)
        anns.append(ImageAnnotation(image_id, file, cfg.image_size, cfg.image_size, caps, boxes))
    save_annotations(anns, out / "annotations.json")
    return anns
