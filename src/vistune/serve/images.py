"""Images from requests: data URLs always, http(s) only when allowed, local paths never.

A server must not become a way to read its own disk or reach its own network, so
`file:` URLs and bare paths are refused outright, and remote fetching is off unless
the operator turns it on; when on, it reaches public addresses only (no loopback,
private or link-local hosts, also after a redirect) unless the operator allows those
too. Sizes are checked before decoding (bytes, then the pixel count from the header)
so a small upload cannot expand into a huge bitmap.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from urllib.parse import urljoin, urlsplit

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


# Where a fetch may go: redirects are followed by hand so that every hop is checked.
MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}


def forbidden_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local (cloud metadata at 169.254.169.254), multicast,
    reserved or unspecified: anything that is not a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1 is loopback too
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def _check_target(url: str, allow_private: bool) -> None:
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a malformed port
    except ValueError as e:
        raise RequestImageError(f"image URL {url!r} is malformed: {e}", code="invalid_image_url") from None
    if parts.scheme not in ("http", "https"):
        raise RequestImageError(f"image URL {url!r} is not http(s)", code="image_url_forbidden")
    if not host:
        raise RequestImageError(f"image URL {url!r} has no host", code="invalid_image_url")
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise RequestImageError(f"cannot resolve {host}: {e}", code="image_fetch_failed") from None
    # Every address must be public: the client may connect to any of them. (A name that
    # resolves differently a moment later, DNS rebinding, is not covered by this check.)
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if forbidden_address(ip):
            raise RequestImageError(f"image URL {url!r} points at a non-public address ({ip}); this server "
                                    "fetches only from public hosts", code="image_url_forbidden")


async def fetch_remote(url: str, max_bytes: int, timeout_s: float = 10.0, allow_private: bool = False) -> bytes:
    """GET an http(s) image. Each hop (the URL and every redirect) must be http(s) and,
    unless ``allow_private``, resolve to public addresses only, so a request cannot make
    the server reach its own loopback, LAN or cloud metadata service."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                await _check_target(url, allow_private)
                async with client.stream("GET", url) as resp:
                    if resp.status_code in _REDIRECTS and "location" in resp.headers:
                        url = urljoin(str(resp.url), resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        raise RequestImageError(f"fetching {url} gave HTTP {resp.status_code}",
                                                code="image_fetch_failed")
                    chunks, total = [], 0
                    async for chunk in resp.aiter_bytes():
                        total += len(chunk)
                        if total > max_bytes:
                            raise RequestImageError(f"image at {url} is over the limit of {max_bytes} bytes",
                                                    code="image_too_large")
                        chunks.append(chunk)
                    return b"".join(chunks)
            raise RequestImageError(f"fetching the image took over {MAX_REDIRECTS} redirects",
                                    code="image_fetch_failed")
    except (httpx.HTTPError, httpx.InvalidURL) as e:  # InvalidURL is no HTTPError
        raise RequestImageError(f"cannot fetch {url}: {e}", code="image_fetch_failed") from None
