"""Projected image embeddings, computed once per image.

A multi-turn conversation sends the same picture with every turn (the OpenAI API
resends the whole history), so the vision tower + projector run once per distinct
image: entries are keyed by a hash of the pixels, least recently used dropped first.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Hashable

import torch
from PIL import Image

from ..data.anyres import Tiles


def image_key(image: Image.Image | torch.Tensor | Tiles) -> Hashable:
    """Content identity of a PIL image, a pixel tensor or an anyres image's tiles."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, Tiles):
        h.update(f"tiles:{image.size}:{image_key(image.pixels)}".encode())
    elif isinstance(image, Image.Image):
        h.update(f"pil:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        t = image.detach().to("cpu").contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ImageEmbedCache:
    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            v = self._items.get(key)
            if v is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
