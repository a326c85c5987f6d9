"""The server under hostile and heavy use (issue 40): huge prompts, image bursts, clients that
leave, cross-site requests, unsupported fields, and the memory a burst leaves behind."""
from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import make_model, solid_image
from live_server import LiveServer, data_url

from vistune.infer.engine import Engine
from vistune.model.checkpoint import save_model
from vistune.serve import api
from vistune.serve.api import ServeSettings, create_app

KEY = "k3y"


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    model, tok = make_model(tokenizer)
    return Engine.from_path(save_model(model, tok, tmp_path_factory.mktemp("hostile") / "tiny-vlm"))


def body(content, **kw) -> dict:
    return {"model": "tiny-vlm", "messages": [{"role": "user", "content": content}], **kw}


def images(n: int, size=(16, 16)) -> list:
    return [{"type": "image_url", "image_url": {"url": data_url(solid_image((9 * i, 0, 0), size))}} for i in range(n)]


def test_a_huge_prompt_is_refused_at_once_and_others_go_on(engine):
    """4 MiB of text cannot fit 1024 tokens: refused from its length, without tokenizing it."""
    with LiveServer(create_app(engine, ServeSettings())) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        huge = "red " * (1 << 20)
        took = {}

        def big():
            t = time.monotonic()
            with pytest.raises(openai.BadRequestError) as ei:
                client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": huge}])
            took["big"] = time.monotonic() - t
            return ei.value.response.json()["error"]

        with ThreadPoolExecutor(2) as pool:
            err = pool.submit(big)
            time.sleep(0.05)
            t = time.monotonic()
            client.chat.completions.create(model="tiny-vlm", max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
            took["small"] = time.monotonic() - t
            err = err.result()
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"], err
    assert took["big"] < 2.0 and took["small"] < 2.0, took


def test_images_that_cannot_fit_are_refused_before_any_decode(engine, monkeypatch):
    small = Engine(engine.loaded)
    small.max_context = 40  # 3 images x 16 tokens cannot fit
    decoded = []
    real = api.image_from_bytes
    monkeypatch.setattr(api, "image_from_bytes", lambda raw, mp: (decoded.append(1), real(raw, mp))[1])
    from fastapi.testclient import TestClient

    with TestClient(create_app(small, ServeSettings())) as tc:
        r = tc.post("/v1/chat/completions", json=body(images(3) + [{"type": "text", "text": "what?"}]))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "3x16" in r.json()["error"]["message"] and decoded == []
    # a pixel budget for the request: the second 16x16 image goes over 400 pixels, refused before decoding
    with TestClient(create_app(engine, ServeSettings(max_request_pixels=400))) as tc:
        r = tc.post("/v1/chat/completions", json=body(images(2) + [{"type": "text", "text": "what?"}]))
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "image_too_large", err
        assert err["param"] == "messages[0].content[1].image_url" and decoded == []


def test_image_decodes_in_flight_are_bounded(engine, monkeypatch):
    lock = threading.Lock()
    now, peak = [0], [0]
    real = api.image_from_bytes

    def slow(raw, mp):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return real(raw, mp)

    monkeypatch.setattr(api, "image_from_bytes", slow)
    with LiveServer(create_app(engine, ServeSettings(max_decodes_in_flight=1))) as srv:
        def one(i):
            return httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                              json=body(images(2) + [{"type": "text", "text": f"what? {i}"}], max_tokens=1))

        with ThreadPoolExecutor(4) as pool:
            codes = [r.status_code for r in pool.map(one, range(4))]
    assert codes == [200] * 4 and peak[0] == 1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_idle_memory_returns_near_baseline_after_a_burst(engine, tmp_path):
    """`vistune serve` decodes a burst of large images (the engine keeps freed memory for speed);
    idle a moment later, the server is back near its size before the burst."""
    import subprocess
    import sys

    from live_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vistune.cli", "serve", "--model", str(engine.loaded.path),
                             "--port", str(port), "--max-image-pixels", str(2048 * 2048), "--max-decodes", "4",
                             "--max-request-pixels", str(8 * 2048 * 2048)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    big = [{"type": "image_url", "image_url": {"url": data_url(solid_image((i, 40, 90), (2048, 2048)))}}
           for i in range(4)]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health").raise_for_status()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        httpx.post(url + "/v1/chat/completions", json=body("warm up", max_tokens=1), timeout=60)
        time.sleep(1.5)
        before = rss_mb(proc.pid)
        peak = [before]
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], rss_mb(proc.pid))
                time.sleep(0.02)

        def one(i):
            return httpx.post(url + "/v1/chat/completions", timeout=120,
                              json=body(big + [{"type": "text", "text": f"what? {i}"}], max_tokens=1)).status_code

        sampler = threading.Thread(target=sample)
        sampler.start()
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(one, range(4)))
        sampling.set()
        sampler.join()
        assert codes == [200] * 4
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health").json()["memory_trims"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    assert peak[0] - before > 50, (before, peak[0])  # the burst really took memory
    assert after - before < 40, (before, peak[0], after)


def test_a_client_that_leaves_stops_its_non_streaming_request(engine):
    # A reply several times longer than the client waits for, whatever the machine's speed.
    settings = ServeSettings(max_tokens_limit=900)
    app = create_app(engine, settings)
    with LiveServer(app) as srv:
        req = body("tell me a story", max_tokens=900, temperature=0)
        full = httpx.post(srv.url + "/v1/chat/completions", json=req, timeout=120).json()
        assert full["usage"]["completion_tokens"] > 600, full["usage"]  # a long reply when read to the end
        stats = app.state.batcher.stats
        steps = stats["steps"]
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/chat/completions", json=req, timeout=0.2)
        deadline = time.monotonic() + 30
        while stats["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert stats["cancelled"] == 1
        assert stats["steps"] - steps < full["usage"]["completion_tokens"] // 2


def test_only_json_bodies_allowed_hosts_and_the_key_everywhere(engine):
    from fastapi.testclient import TestClient

    ok = body("hi", max_tokens=1)
    with TestClient(create_app(engine, ServeSettings(allowed_hosts=["localhost", "127.0.0.1", "::1"])),
                    base_url="http://127.0.0.1:8000") as tc:
        import json

        # what a web page can send cross-site without a preflight
        r = tc.post("/v1/chat/completions", content=json.dumps(ok), headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        assert tc.post("/v1/chat/completions", json=ok).status_code == 200
        assert tc.post("/v1/chat/completions", json=ok, headers={"Host": "[::1]:8000"}).status_code == 200
        r = tc.post("/v1/chat/completions", json=ok, headers={"Host": "evil.example:8000"})  # DNS rebinding
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        r = tc.post("/v1/chat/completions", json=ok, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert tc.post("/v1/chat/completions", json=ok, headers={"Origin": "http://localhost:8000"}).status_code == 200
    with TestClient(create_app(engine, ServeSettings(api_key=KEY))) as tc:
        for path in ("/docs", "/openapi.json", "/v1/models", "/redoc"):
            assert tc.get(path).status_code == 401, path
            assert tc.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        assert tc.get("/health").status_code == 200


def test_cli_serve_allows_loopback_host_names_by_default(tokenizer, tmp_path, monkeypatch):
    import uvicorn

    from vistune.cli import main

    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "m")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    assert main(["serve", "--model", str(path)]) == 0
    assert set(started["app"].state.settings.allowed_hosts) == {"localhost", "127.0.0.1", "::1"}
    assert main(["serve", "--model", str(path), "--allowed-hosts", "box.lan,localhost"]) == 0
    assert started["app"].state.settings.allowed_hosts == ["box.lan", "localhost"]
    assert main(["serve", "--model", str(path), "--host", "0.0.0.0"]) == 0
    assert started["app"].state.settings.allowed_hosts is None


def test_max_tokens_over_the_limit_is_clipped_with_finish_reason_length(engine):
    from fastapi.testclient import TestClient

    with TestClient(create_app(engine, ServeSettings(max_tokens_limit=8))) as tc:
        r = tc.post("/v1/chat/completions", json=body("tell me a story", max_tokens=4096))
        assert r.status_code == 200, r.json()
        out = r.json()
        assert out["usage"]["completion_tokens"] <= 8
        if out["usage"]["completion_tokens"] == 8:
            assert out["choices"][0]["finish_reason"] == "length"


def bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_image_error_details(engine):
    from fastapi.testclient import TestClient

    png = io.BytesIO()
    solid_image((1, 2, 3), (16, 16)).save(png, format="PNG")
    raw = png.getvalue()

    def post(tc, url):
        r = tc.post("/v1/chat/completions", json=body([{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "what?"}], max_tokens=1))
        return r.status_code, (r.json()["error"] if r.status_code != 200 else None)

    with TestClient(create_app(engine, ServeSettings())) as tc:
        status, err = post(tc, "data:image/png;base64," + base64.b64encode(bomb_png(30000, 30000)).decode())
        assert (status, err["code"]) == (400, "image_too_large"), err
        wrapped = base64.encodebytes(raw).decode()  # 76 columns, as the `base64` tool writes
        assert "\n" in wrapped.strip()
        assert post(tc, "data:image/png;base64," + wrapped) == (200, None)
        tail = b"\0" * (-len(raw) % 3) + b"\xfb\xef\xbe\xff\xff\xff\0"  # "----____", which PIL ignores
        urlsafe = base64.urlsafe_b64encode(raw + tail).decode().rstrip("=")
        assert "-" in urlsafe and "_" in urlsafe and len(urlsafe) % 4
        assert post(tc, "data:image/png;base64," + urlsafe) == (200, None)
    with TestClient(create_app(engine, ServeSettings(allow_remote_images=True, allow_private_image_hosts=True))) as tc:
        status, err = post(tc, "ftp://example.com/x.png")
        assert status == 400 and err["code"] == "invalid_image_url" and "ftp: URLs are not fetched" in err["message"]
        # private hosts allowed, yet cloud metadata stays closed (refused before any connection)
        for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/",
                    "http://[fe80::1]/x.png"):
            status, err = post(tc, url)
            assert status == 400 and err["code"] == "image_url_forbidden" and "--allow-image-host" in err["message"]
