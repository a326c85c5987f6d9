"""Images from requests: data URLs always, http(s) only when allowed, local paths never.

A server must not become a way to read its own disk or reach its own network, so
`file:` URLs and bare paths are refused outright, and remote fetching is off unless
the operator turns it on. Sizes are checked before decoding (bytes, then the pixel
count from the header) so a small upload cannot expand into a huge bitmap.
"""
from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from ..data.images import ImageError, open_image

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)


class RequestImageError(ValueError):
    """An image of a request is unusable; ``code`` is the OpenAI-style error code."""

    def __init__(self, message: str, code: str = "invalid_image", status: int = 400):
        super().__init__(message)
        self.code = code
        self.status = status


def decode_data_url(url: str, max_bytes: int) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise RequestImageError("image_url must be a base64 data URL (data:image/...;base64,...)")
    mime = m.group("mime")
    if mime and not mime.startswith("image/"):
        raise RequestImageError(f"data URL has media type {mime!r}, not an image")
    payload = m.group("data").strip()
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise RequestImageError(f"image is over the limit of {max_bytes} bytes", code="image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestImageError("image data URL is not valid base64") from None
    if len(raw) > max_bytes:
        raise RequestImageError(f"image is {len(raw)} bytes, over the limit of {max_bytes}", code="image_too_large")
    return raw


def image_from_bytes(raw: bytes, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            w, h = probe.size
    except Exception:
        raise RequestImageError("image data cannot be decoded as an image") from None
    if w * h > max_pixels:
        raise RequestImageError(f"image is {w}x{h} pixels, over the limit of {max_pixels}", code="image_too_large")
    try:
        return open_image(raw, max_pixels)
    except ImageError as e:
        raise RequestImageError(str(e)) from None


def url_kind(url: str) -> str:
    """'data', 'remote', or 'refused' (file URLs, paths, anything else)."""
    low = url[:16].lower()
    if low.startswith("data:"):
        return "data"
    if low.startswith(("http://", "https://")):
        return "remote"
    return "refused"


async def fetch_remote(url: str, max_bytes: int, timeout_s: float = 10.0) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise RequestImageError(f"fetching {url} gave HTTP {resp.status_code}", code="image_fetch_failed")
                chunks, total = [], 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise RequestImageError(f"image at {url} is over the limit of {max_bytes} bytes",
                                                code="image_too_large")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as e:
        raise RequestImageError(f"cannot fetch {url}: {e}", code="image_fetch_failed") from None
