"""Images from requests: data URLs always, http(s) only when allowed, local paths never.

A server must not become a way to read its own disk or reach its own network, so
`file:` URLs and bare paths are refused outright, and remote fetching is off unless
the operator turns it on; when on, it reaches public addresses only (no loopback,
private or link-local hosts, also after a redirect) unless the operator allows those
too, and it connects to the very address it checked, so a name that resolves differently
a moment later (DNS rebinding) cannot move the connection elsewhere. Sizes are checked
before decoding (bytes, then the pixel count from the header) so a small upload cannot
expand into a huge bitmap.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urljoin

from PIL import Image

from ..data.images import ImageError, open_image

if TYPE_CHECKING:
    import httpx

_WHITESPACE = re.compile(r"\s+")
_URLSAFE = str.maketrans("-_", "+/")
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
    # Line-wrapped (the `base64` tool's 76 columns) and URL-safe alphabets are common spellings.
    payload = _WHITESPACE.sub("", m.group("data")).translate(_URLSAFE)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise RequestImageError(f"image is over the limit of {max_bytes} bytes", code="image_too_large")
    payload += "=" * (-len(payload) % 4) if len(payload) % 4 != 1 else ""  # URL-safe base64 often drops the padding
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestImageError("image data URL is not valid base64") from None
    if len(raw) > max_bytes:
        raise RequestImageError(f"image is {len(raw)} bytes, over the limit of {max_bytes}", code="image_too_large")
    return raw


def image_size(raw: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone; refuses images over ``max_pixels`` before any decoding."""
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError:  # PIL's own guard trips first on a huge header: it is a size error
        raise RequestImageError(f"image is a decompression bomb, far over the limit of {max_pixels} pixels",
                                code="image_too_large") from None
    except Exception:
        raise RequestImageError("image data cannot be decoded as an image") from None
    if w * h > max_pixels:
        raise RequestImageError(f"image is {w}x{h} pixels, over the limit of {max_pixels}", code="image_too_large")
    return w, h


def image_from_bytes(raw: bytes, max_pixels: int) -> Image.Image:
    image_size(raw, max_pixels)
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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Cloud metadata services outside the link-local ranges (AWS over IPv6, Alibaba).
METADATA_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("fd00:ec2::254/128", "100.100.100.200/32"))


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1 is loopback too
        return ip.ipv4_mapped
    return ip


def metadata_address(ip: IPAddress) -> bool:
    """Link-local (169.254.169.254, fe80::) or a known cloud metadata address: where a server's
    credentials are one GET away, so allowing private hosts does not open these."""
    ip = _unmapped(ip)
    return ip.is_link_local or any(ip in n for n in METADATA_NETWORKS)


def forbidden_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local (cloud metadata at 169.254.169.254), multicast,
    reserved or unspecified: anything that is not a public unicast address."""
    ip = _unmapped(ip)
    return not ip.is_global or ip.is_multicast


def _parse_target(url: str) -> httpx.URL:
    """The URL as httpx will send it: the host that is resolved and checked is the one
    that the request names, with no second parser to disagree about it."""
    import httpx

    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise RequestImageError(f"image URL {url!r} is malformed: {e}", code="invalid_image_url") from None
    if target.scheme not in ("http", "https"):
        raise RequestImageError(f"image URL {url!r} is not http(s)", code="image_url_forbidden")
    if not target.raw_host:
        raise RequestImageError(f"image URL {url!r} has no host", code="invalid_image_url")
    if target.port is not None and not 0 < target.port < 65536:
        raise RequestImageError(f"image URL {url!r} is malformed: port {target.port} is out of range",
                                code="invalid_image_url")
    return target


async def _resolve(host: str, timeout_s: float) -> list[str]:
    """The host's addresses, once: the fetch connects to these and never looks the name up again."""
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout_s)
    except (OSError, asyncio.TimeoutError) as e:
        raise RequestImageError(f"cannot resolve {host}: {str(e) or 'timed out'}",
                                code="image_fetch_failed") from None
    addresses = list(dict.fromkeys(sockaddr[0] for *_, sockaddr in infos))  # an address can come twice
    if not addresses:
        raise RequestImageError(f"cannot resolve {host}: no addresses", code="image_fetch_failed")
    return addresses


def _check_addresses(url: str, addresses: list[str], allow_private: bool, allowed: Sequence[IPNetwork]) -> None:
    # Every address must pass: the fetch may connect to any of them.
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(_unmapped(ip) in n or ip in n for n in allowed):
            continue  # the operator named it
        if metadata_address(ip):
            raise RequestImageError(f"image URL {url!r} points at a link-local or cloud metadata address ({ip}); "
                                    "this server fetches from it only when it is named with --allow-image-host",
                                    code="image_url_forbidden")
        if not allow_private and forbidden_address(ip):
            raise RequestImageError(f"image URL {url!r} points at a non-public address ({ip}); this server "
                                    "fetches only from public hosts", code="image_url_forbidden")


def _pinned_request(client: httpx.AsyncClient, target: httpx.URL, address: str) -> httpx.Request:
    """A GET of ``target`` that connects to ``address`` and nowhere else.

    Letting httpx resolve the name again would let a DNS-rebinding host answer a public
    address to the check and a private one to the connection. So the URL names the
    checked address, while the Host header and TLS (SNI and certificate verification)
    keep the original host name.
    """
    host = target.raw_host.decode("ascii")
    return client.build_request("GET", target.copy_with(host=address),
                                headers={"Host": target.netloc.decode("ascii")},
                                extensions={"sni_hostname": host})


async def _send_pinned(client: httpx.AsyncClient, target: httpx.URL, addresses: list[str]) -> httpx.Response:
    """The streamed response from the first address that accepts a connection, as a
    client that resolved the name itself would try them."""
    import httpx

    for address in addresses[:-1]:
        try:
            return await client.send(_pinned_request(client, target, address), stream=True)
        except httpx.ConnectError:
            continue  # refused or unreachable; a timeout ends the fetch instead of waiting once per address
    return await client.send(_pinned_request(client, target, addresses[-1]), stream=True)


async def _read_capped(resp: httpx.Response, url: str, max_bytes: int) -> bytes:
    chunks, total = [], 0
    async for chunk in resp.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise RequestImageError(f"image at {url} is over the limit of {max_bytes} bytes",
                                    code="image_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _client(timeout_s: float) -> httpx.AsyncClient:
    import httpx

    # trust_env=False: a proxy from the environment would connect on its own resolution
    # (and .netrc would hand the operator's credentials to any host a request names).
    # No keep-alive: a TLS connection verified for one host name must not carry a later
    # hop to another name that resolved to the same address.
    return httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_keepalive_connections=0))


async def fetch_remote(url: str, max_bytes: int, timeout_s: float = 10.0, allow_private: bool = False,
                       allowed: Sequence[IPNetwork] = ()) -> bytes:
    """GET an http(s) image. Each hop (the URL and every redirect) must be http(s) and,
    unless ``allow_private``, resolve to public addresses only, so a request cannot make
    the server reach its own loopback, LAN or cloud metadata service; link-local and metadata
    addresses stay closed even then, unless in ``allowed`` (addresses the operator named).
    The host name is resolved once per hop and the connection goes to an address that was checked."""
    import httpx

    try:
        async with _client(timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target = _parse_target(url)
                addresses = await _resolve(target.raw_host.decode("ascii"), timeout_s)
                _check_addresses(url, addresses, allow_private, allowed)
                resp = await _send_pinned(client, target, addresses)
                try:
                    if resp.status_code in _REDIRECTS and "location" in resp.headers:
                        # relative to the URL as named, not to the address it was fetched from
                        url = urljoin(str(target), resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        raise RequestImageError(f"fetching {url} gave HTTP {resp.status_code}",
                                                code="image_fetch_failed")
                    return await _read_capped(resp, url, max_bytes)
                finally:
                    await resp.aclose()
            raise RequestImageError(f"fetching the image took over {MAX_REDIRECTS} redirects",
                                    code="image_fetch_failed")
    except (httpx.HTTPError, httpx.InvalidURL) as e:  # InvalidURL is no HTTPError
        raise RequestImageError(f"cannot fetch {url}: {e}", code="image_fetch_failed") from None
