"""Remote image fetching: every connection goes to an address that was resolved and checked.

No test here needs the internet: servers listen on loopback addresses, and host names are
answered by a stand-in for `socket.getaddrinfo` (which the fetch's resolver and httpx's
own both use), so a name can answer differently from one lookup to the next.
"""
from __future__ import annotations

import asyncio
import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading

import httpx
import pytest

from vistune.serve import images
from vistune.serve.images import RequestImageError, fetch_remote

PNG = b"\x89PNG\r\n\x1a\n not really, but bytes are all a fetch returns"
SECRET = b"internal only"


class Recorder(http.server.BaseHTTPRequestHandler):
    """Serves the server's body at /img.png, redirects /hop to the `hop` URL; notes each request's
    path and Host."""

    hop = ""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Host")))
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", self.hop)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args):
        pass


def serve(host: str, port: int = 0, body: bytes = PNG, tls: ssl.SSLContext | None = None):
    httpd = http.server.ThreadingHTTPServer((host, port), Recorder)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.seen, httpd.body = [], body
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture
def public_and_internal():
    """A 'public' server on 127.0.0.2 and an internal one on 127.0.0.1, on the same port:
    one URL reaches either, depending only on what its host name resolves to."""
    for _ in range(20):
        public = serve("127.0.0.2")
        try:
            internal = serve("127.0.0.1", public.server_address[1], body=SECRET)
            break
        except OSError:  # that port is taken on 127.0.0.1; try another
            public.shutdown()
            public.server_close()
    else:
        pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
    yield public, internal
    for httpd in (public, internal):
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def dns(monkeypatch):
    """answers[name] is the list of answers for successive lookups of name (the last repeats);
    lookups[name] counts them. Other names resolve as usual."""
    answers: dict[str, list[list[str]]] = {}
    lookups: dict[str, int] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if isinstance(host, bytes):  # anyio, under httpx, asks in bytes
            host = host.decode("ascii")
        if host not in answers:
            return real(host, port, family, type, proto, flags)
        n = lookups[host] = lookups.get(host, 0) + 1
        addresses = answers[host][min(n, len(answers[host])) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


@pytest.fixture
def public_127_0_0_2(monkeypatch):
    """127.0.0.2 counts as a public address, so that a local server can stand for a public host."""
    real = images.forbidden_address
    monkeypatch.setattr(images, "forbidden_address", lambda ip: ip != ipaddress.ip_address("127.0.0.2") and real(ip))


def fetch(url: str, **kw) -> bytes:
    return asyncio.run(fetch_remote(url, max_bytes=10_000, timeout_s=5, **kw))


def test_a_rebinding_name_cannot_move_the_connection_to_loopback(public_and_internal, dns, public_127_0_0_2):
    public, internal = public_and_internal
    port = public.server_address[1]
    answers, lookups = dns
    # The first lookup, the one that is checked, gives the 'public' address; every later one gives loopback.
    answers["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    assert fetch(f"http://rebind.test:{port}/img.png") == PNG
    assert lookups["rebind.test"] == 1  # resolved once; the connection used that answer
    assert public.seen == [("/img.png", f"rebind.test:{port}")]  # the server still sees the name it was asked by
    assert internal.seen == []


def test_each_redirect_hop_is_resolved_once_checked_and_pinned(public_and_internal, dns, public_127_0_0_2,
                                                                 monkeypatch):
    public, internal = public_and_internal
    port = public.server_address[1]
    answers, lookups = dns
    monkeypatch.setattr(Recorder, "hop", f"http://rebind.test:{port}/img.png")
    # The hop to another name that rebinds after its check is followed to the checked address.
    answers["start.test"] = [["127.0.0.2"]]
    answers["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    assert fetch(f"http://start.test:{port}/hop") == PNG
    assert public.seen == [("/hop", f"start.test:{port}"), ("/img.png", f"rebind.test:{port}")]
    assert lookups == {"start.test": 1, "rebind.test": 1}
    # A hop back to the same name is a new lookup, checked again: now loopback, so refused.
    monkeypatch.setattr(Recorder, "hop", f"http://start.test:{port}/img.png")
    answers["start.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    lookups.clear()
    with pytest.raises(RequestImageError) as ei:
        fetch(f"http://start.test:{port}/hop")
    assert ei.value.code == "image_url_forbidden" and "127.0.0.1" in str(ei.value)
    assert lookups == {"start.test": 2}
    assert internal.seen == []


def test_one_non_public_address_refuses_the_name(public_and_internal, dns, public_127_0_0_2):
    public, internal = public_and_internal
    answers, _ = dns
    answers["mixed.test"] = [["127.0.0.2", "127.0.0.1"]]
    with pytest.raises(RequestImageError) as ei:
        fetch(f"http://mixed.test:{public.server_address[1]}/img.png")
    assert ei.value.code == "image_url_forbidden"
    assert public.seen == [] and internal.seen == []


def test_loopback_fetches_when_private_hosts_are_allowed(public_and_internal, dns):
    public, internal = public_and_internal
    port = internal.server_address[1]
    with pytest.raises(RequestImageError) as ei:  # refused by default
        fetch(f"http://127.0.0.1:{port}/img.png")
    assert ei.value.code == "image_url_forbidden" and internal.seen == []
    assert fetch(f"http://127.0.0.1:{port}/img.png", allow_private=True) == SECRET
    assert fetch(f"http://localhost:{port}/img.png", allow_private=True) == SECRET
    assert internal.seen == [("/img.png", f"127.0.0.1:{port}"), ("/img.png", f"localhost:{port}")]
    # A name with several addresses is tried in order, as the system's own resolver would be:
    # 127.0.0.3 refuses the connection, 127.0.0.1 takes it.
    answers, lookups = dns
    answers["two.test"] = [["127.0.0.3", "127.0.0.1"]]
    assert fetch(f"http://two.test:{port}/img.png", allow_private=True) == SECRET
    assert internal.seen[-1] == ("/img.png", f"two.test:{port}") and lookups["two.test"] == 1
    assert public.seen == []


@pytest.mark.parametrize("url", ["http://example.com:99999/x.png", "http://:80/x.png", "http://[::1/x.png"])
def test_malformed_urls_are_refused_before_any_lookup(url, dns):
    _, lookups = dns
    with pytest.raises(RequestImageError) as ei:
        fetch(url, allow_private=True)
    assert ei.value.code == "invalid_image_url" and lookups == {}


def test_https_request_names_the_checked_address_and_keeps_the_host_for_tls():
    async def build():
        async with httpx.AsyncClient() as client:
            return images._pinned_request(client, httpx.URL("https://Images.Example:8443/a.png?v=1"), "203.0.113.7")

    req = asyncio.run(build())
    assert req.url == httpx.URL("https://203.0.113.7:8443/a.png?v=1")
    assert req.headers["Host"] == "images.example:8443"
    assert req.extensions["sni_hostname"] == "images.example"


@pytest.fixture
def tls_server(tmp_path):
    """An https server on 127.0.0.1 whose certificate names images.test; yields (server, port,
    a client context that trusts it, the SNI names it saw)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.test",
                    "-addext", "subjectAltName=DNS:images.test"], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sni = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    httpd = serve("127.0.0.1", tls=server_ctx)
    yield httpd, httpd.server_address[1], ssl.create_default_context(cafile=str(cert)), sni
    httpd.shutdown()
    httpd.server_close()


def test_https_pinned_to_an_address_verifies_the_certificate_for_the_host_name(tls_server):
    httpd, port, client_ctx, sni = tls_server

    async def get(name: str) -> httpx.Response:
        async with httpx.AsyncClient(verify=client_ctx, trust_env=False) as client:
            # images.test has no DNS entry here: only the pinned address can be reached
            return await client.send(images._pinned_request(client, httpx.URL(f"https://{name}:{port}/img.png"),
                                                            "127.0.0.1"))

    resp = asyncio.run(get("images.test"))
    assert resp.status_code == 200 and resp.content == PNG
    assert sni == ["images.test"] and httpd.seen == [("/img.png", f"images.test:{port}")]
    # The certificate is checked against the host name, not the address: another name fails.
    with pytest.raises(httpx.ConnectError, match="certificate|hostname"):
        asyncio.run(get("other.test"))
    assert httpd.seen == [("/img.png", f"images.test:{port}")]
