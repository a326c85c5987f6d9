"""What a request must show before any route sees it: an allowed Host and Origin, the API
key, and a JSON body.

A server on loopback is still reachable from every web page the user opens: the browser
sends a "simple" cross-site POST (a JSON text as `text/plain`) without asking, and a
DNS-rebinding name makes a page's own origin point at 127.0.0.1. So POSTs to /v1 must be
`application/json` (which a page cannot send cross-site without a preflight this server
never grants), and the Host and any Origin must name an allowed host.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name is this machine only."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host of a Host header (``name``, ``name:port``, ``[v6]:port``), lower case."""
    return (urlsplit("//" + value).hostname or "").rstrip(".")


@dataclass
class GuardSettings:
    api_key: str | None = None
    allowed_hosts: Sequence[str] | None = None  # None: any Host and Origin
    open_paths: tuple[str, ...] = ("/health",)  # never need the key
    own_auth_prefix: str | None = None  # a mounted app with its own login (the web page)
    json_prefix: str = "/v1/"  # where a POST must be application/json


def error(status: int, message: str, code: str, type: str = "invalid_request_error") -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": type, "param": None, "code": code}},
                        status_code=status, headers=headers)


class Guard:
    """Pure ASGI middleware (it leaves the body and disconnect messages to the route)."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: GuardSettings):
        self.app = app
        self.s = settings
        self.hosts = None if settings.allowed_hosts is None or "*" in settings.allowed_hosts else \
            {h.lower().strip("[]") for h in settings.allowed_hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            refusal = self.check(scope)
            if refusal is not None:
                if scope["type"] == "http":
                    await refusal(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        path = scope.get("path", "")
        if self.hosts is not None:
            host = host_name(headers.get("host", ""))
            if host not in self.hosts:
                return error(403, f"Host {headers.get('host', '')!r} is not allowed on this server "
                             "(start it with --allowed-hosts to add it)", "host_not_allowed")
            origin = headers.get("origin")
            if origin is not None and (urlsplit(origin).hostname or "").rstrip(".") not in self.hosts:
                return error(403, f"Origin {origin!r} is not allowed on this server "
                             "(start it with --allowed-hosts to add its host)", "origin_not_allowed")
        own_auth = self.s.own_auth_prefix and (path == self.s.own_auth_prefix
                                               or path.startswith(self.s.own_auth_prefix + "/"))
        if self.s.api_key and path not in self.s.open_paths and not own_auth:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.s.api_key.encode()):
                return error(401, "Incorrect or missing API key.", "invalid_api_key")
        if scope["type"] == "http" and scope.get("method") == "POST" and path.startswith(self.s.json_prefix):
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return error(415, f"request body must be application/json, not {media or 'untyped'!r}",
                             "unsupported_media_type")
        return None
