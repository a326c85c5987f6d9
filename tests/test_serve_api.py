"""The OpenAI-compatible server, driven by the real `openai` client over loopback."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import make_model, noise_image, solid_image
from live_server import LiveServer, data_url

from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.model.checkpoint import save_model
from vistune.serve.api import ServeSettings, create_app

KEY = "test-secret"


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path_factory.mktemp("serve") / "tiny-vlm")
    engine = Engine.from_path(path)
    settings = ServeSettings(api_key=KEY, max_images_per_request=2, max_body_bytes=200_000,
                             max_image_pixels=100_000, max_image_bytes=20_000, max_tokens_limit=64,
                             batch_wait_ms=20)
    app = create_app(engine, settings)
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield engine, app, srv, client


def ask(client, content, **kw):
    return client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(served):
    engine, app, srv, client = served
    assert [m.id for m in client.models.list().data] == ["tiny-vlm"]
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_plain_answer_and_usage(served):
    engine, app, srv, client = served
    resp = ask(client, "what color is the circle?", max_tokens=12, temperature=0)
    want = engine.generate([Prompt.ask("what color is the circle?")], GenerationConfig(max_new_tokens=12))[0]
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert resp.usage.prompt_tokens == want.prompt_tokens
    assert resp.usage.completion_tokens == want.completion_tokens
    assert resp.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    assert resp.object == "chat.completion" and resp.model == "tiny-vlm"


def test_streaming(served):
    engine, app, srv, client = served
    stream = ask(client, "describe the picture", max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage]
    want = ask(client, "describe the picture", max_tokens=16)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert text == want.choices[0].message.content
    assert finish == [want.choices[0].finish_reason]
    assert usage and usage[0].completion_tokens == want.usage.completion_tokens


def test_image_as_data_url(served):
    engine, app, srv, client = served
    img = noise_image(5)
    resp = ask(client, [{"type": "image_url", "image_url": {"url": data_url(img)}},
                        {"type": "text", "text": "what is in the image?"}], max_tokens=10)
    want = engine.generate([Prompt.ask("what is in the image?", [img])], GenerationConfig(max_new_tokens=10))[0]
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == want.prompt_tokens  # the image tokens are counted
    # A system message and a multi-turn history map onto the template's system text and turns.
    resp = client.chat.completions.create(model="tiny-vlm", max_tokens=8, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                     {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a square"},
        {"role": "user", "content": "which color?"}])
    want = engine.generate([Prompt([{"from": "human", "value": "<image>\nwhat is it?"},
                                    {"from": "gpt", "value": "a square"},
                                    {"from": "human", "value": "which color?"}], [img], system="Answer briefly.")],
                           GenerationConfig(max_new_tokens=8))[0]
    assert resp.choices[0].message.content == want.text


@pytest.mark.parametrize("case", ["missing_messages", "bad_base64", "file_path", "file_url", "too_many_images",
                                  "remote_disabled", "too_many_pixels", "image_token_in_text", "logprobs",
                                  "tools", "response_format", "logit_bias", "frequency_penalty",
                                  "unknown_model", "last_not_user", "n2", "too_many_image_bytes",
                                  "not_an_image_type", "context_length", "top_p_2", "temperature_negative",
                                  "temperature_3", "top_k_negative", "repetition_penalty_0", "seed_overflow",
                                  "five_stops", "stop_not_a_string", "content_part_not_text"])
def test_bad_requests_get_400s_with_openai_error_bodies(served, case):
    engine, app, srv, client = served
    img = data_url(solid_image((0, 0, 255), (16, 16)))

    def image(url):
        return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]

    calls = {
        "missing_messages": lambda: client.chat.completions.create(model="tiny-vlm", messages=openai.omit),
        "bad_base64": lambda: ask(client, image("data:image/png;base64,@@not*base64@@")),
        "file_path": lambda: ask(client, image("/etc/passwd")),
        "file_url": lambda: ask(client, image("file:///etc/passwd")),
        "too_many_images": lambda: ask(client, image(img) + image(img) + image(img)),
        "remote_disabled": lambda: ask(client, image("http://127.0.0.1:9/x.png")),
        "too_many_pixels": lambda: ask(client, image(data_url(solid_image((1, 2, 3), (400, 400))))),
        "image_token_in_text": lambda: ask(client, "look: <image>"),
        "logprobs": lambda: ask(client, "hi", logprobs=True, top_logprobs=2),
        "tools": lambda: ask(client, "hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        "response_format": lambda: ask(client, "hi", response_format={"type": "json_object"}),
        "logit_bias": lambda: ask(client, "hi", logit_bias={"42": 10}),
        "frequency_penalty": lambda: ask(client, "hi", frequency_penalty=0.5),
        "unknown_model": lambda: client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}]),
        "last_not_user": lambda: client.chat.completions.create(model="tiny-vlm", messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
        "n2": lambda: ask(client, "hi", n=2),
        # 100x100 noise does not compress: ~30 kB of PNG, over the 20 kB limit, under the pixel limit
        "too_many_image_bytes": lambda: ask(client, image(data_url(noise_image(7, (100, 100))))),
        "not_an_image_type": lambda: ask(client, image("data:text/plain;base64,aGVsbG8=")),
        "context_length": lambda: ask(client, "red " * 1100),  # ~1100 tokens; the tiny model's context is 1024
        "top_p_2": lambda: ask(client, "hi", top_p=2),
        "temperature_negative": lambda: ask(client, "hi", temperature=-1),
        "temperature_3": lambda: ask(client, "hi", temperature=3),
        "top_k_negative": lambda: ask(client, "hi", extra_body={"top_k": -1}),
        "repetition_penalty_0": lambda: ask(client, "hi", extra_body={"repetition_penalty": 0}),
        "seed_overflow": lambda: ask(client, "hi", temperature=1, seed=2**64),  # was a 500 from the worker
        "five_stops": lambda: ask(client, "hi", stop=["a", "b", "c", "d", "e"]),
        "stop_not_a_string": lambda: ask(client, "hi", stop=[1]),  # was param "stop.str"
        "content_part_not_text": lambda: ask(client, [{"type": "text", "text": 1}]),  # was "messages[0].content.str"
    }
    expect = {  # case: (status, param, code)
        "missing_messages": (400, "messages", "missing_required_parameter"),
        "bad_base64": (400, "messages[0].content[0].image_url", "invalid_image"),
        "file_path": (400, "messages[0].content[0].image_url", "invalid_image_url"),
        "file_url": (400, "messages[0].content[0].image_url", "invalid_image_url"),
        "too_many_images": (400, "messages", "too_many_images"),
        "remote_disabled": (400, "messages[0].content[0].image_url", "remote_images_disabled"),
        "too_many_pixels": (400, "messages[0].content[0].image_url", "image_too_large"),
        "image_token_in_text": (400, "messages[0].content", None),
        "logprobs": (400, "logprobs", "unsupported_parameter"),
        "tools": (400, "tools", "unsupported_parameter"),
        "response_format": (400, "response_format", "unsupported_parameter"),
        "logit_bias": (400, "logit_bias", "unsupported_parameter"),
        "frequency_penalty": (400, "frequency_penalty", "unsupported_parameter"),
        "unknown_model": (404, "model", "model_not_found"),
        "last_not_user": (400, "messages", None),
        "n2": (400, "n", None),
        "too_many_image_bytes": (400, "messages[0].content[0].image_url", "image_too_large"),
        "not_an_image_type": (400, "messages[0].content[0].image_url", "invalid_image"),
        "context_length": (400, "messages", "context_length_exceeded"),
        "top_p_2": (400, "top_p", "invalid_value"),
        "temperature_negative": (400, "temperature", "invalid_value"),
        "temperature_3": (400, "temperature", "invalid_value"),
        "top_k_negative": (400, "top_k", "invalid_value"),
        "repetition_penalty_0": (400, "repetition_penalty", "invalid_value"),
        "seed_overflow": (400, "seed", "invalid_value"),
        "five_stops": (400, "stop", None),
        "stop_not_a_string": (400, "stop", "invalid_value"),
        "content_part_not_text": (400, "messages[0].content", "invalid_value"),
    }[case]
    with pytest.raises(openai.APIStatusError) as ei:
        calls[case]()
    status, param, code = expect
    assert ei.value.status_code == status
    err = ei.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code


def test_image_bytes_limit_counts_the_decoded_bytes(served):
    """The limit is on the decoded image: one byte over is refused before decoding the image,
    exactly the limit passes the size check (and these bytes then fail as no image)."""
    import base64

    engine, app, srv, client = served
    limit = app.state.settings.max_image_bytes

    def refusal(n_bytes: int) -> dict:
        url = "data:image/png;base64," + base64.b64encode(b"\0" * n_bytes).decode()
        with pytest.raises(openai.BadRequestError) as ei:
            ask(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])
        return ei.value.response.json()["error"]

    over = refusal(limit + 1)
    assert over["code"] == "image_too_large" and str(limit) in over["message"]
    at = refusal(limit)
    assert at["code"] == "invalid_image" and "cannot be decoded" in at["message"]


def test_seeded_sampling_is_reproducible(served):
    engine, app, srv, client = served
    q = "tell me a story"

    def sample(seed: int) -> str:
        return ask(client, q, max_tokens=24, temperature=1.0, seed=seed).choices[0].message.content

    greedy = ask(client, q, max_tokens=24).choices[0].message.content
    first = sample(3)
    assert sample(3) == first  # same seed, same text
    want = engine.generate([Prompt.ask(q)], GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3))[0].text
    assert first == want
    assert first != greedy  # temperature > 0 really samples
    assert len({first, *(sample(s) for s in (4, 5, 6))}) > 1  # and the seed really matters


def test_top_k_top_p_and_repetition_penalty_reach_the_sampler(served):
    engine, app, srv, client = served
    q = "tell me a story"

    def text(**kw) -> str:
        return ask(client, q, max_tokens=24, **kw).choices[0].message.content

    greedy = text()
    sampled = text(temperature=1.0, seed=5)
    assert sampled != greedy  # so the equalities below are not vacuous
    # Keeping only the likeliest token (top_k=1, or a tiny top_p) makes sampling greedy.
    assert text(temperature=1.0, seed=5, extra_body={"top_k": 1}) == greedy
    assert text(temperature=1.0, seed=5, top_p=1e-6) == greedy
    penalised = text(extra_body={"repetition_penalty": 5.0})
    want = engine.generate([Prompt.ask(q)], GenerationConfig(max_new_tokens=24, repetition_penalty=5.0))[0].text
    assert penalised == want and penalised != greedy


def test_stop_strings_cut_the_reply_and_are_not_returned(served):
    engine, app, srv, client = served
    q = "tell me a story"
    full = ask(client, q, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece from the middle of the greedy reply
    assert stop.strip() and full.index(stop) > 0
    want = full[:full.index(stop)].strip()
    resp = ask(client, q, max_tokens=24, stop=stop)
    assert resp.choices[0].message.content == want and resp.choices[0].finish_reason == "stop"
    assert stop not in resp.choices[0].message.content
    assert resp.usage.completion_tokens < ask(client, q, max_tokens=24).usage.completion_tokens
    # A list of stops cuts at the first to appear; streaming cuts the same and never sends the stop.
    chunks = list(ask(client, q, max_tokens=24, stop=["no such text", stop], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == want and stop not in streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_wrong_api_key_is_401(served):
    engine, app, srv, client = served
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = httpx.Client(base_url=srv.url)  # no Authorization header at all
            r = bad.post("/v1/chat/completions", json={"model": "tiny-vlm", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            continue
        with pytest.raises(openai.AuthenticationError) as ei:
            ask(bad, "hi")
        assert ei.value.response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_body_over_the_limit_is_413(served):
    engine, app, srv, client = served
    with pytest.raises(openai.APIStatusError) as ei:
        ask(client, "red " * 60_000)
    assert ei.value.status_code == 413 and ei.value.response.json()["error"]["code"] == "body_too_large"
    # Without a Content-Length (chunked upload) the limit holds too.
    body = b'{"model": "tiny-vlm", "messages": [{"role": "user", "content": "' + b"a" * 300_000 + b'"}]}'
    r = httpx.post(srv.url + "/v1/chat/completions", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413


def test_16_concurrent_clients_equal_sequential_answers(served):
    engine, app, srv, client = served
    questions = [("what color is it?", None), ("how many objects?", noise_image(1)),
                 ("describe the image in detail please", noise_image(2)), ("yes or no?", None)] * 4
    questions = [(f"{q} ({i})", img) for i, (q, img) in enumerate(questions)]

    def content(q, img):
        if img is None:
            return q
        return [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": q}]

    def one(item):
        r = ask(client, content(*item), max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    sequential = [one(item) for item in questions]
    before = dict(app.state.batcher.stats)
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(one, questions))
    assert concurrent == sequential
    after = app.state.batcher.stats
    assert after["requests"] - before["requests"] == 16
    # Requests arriving together were decoded together: well over one row per step on average.
    assert (after["row_steps"] - before["row_steps"]) / (after["steps"] - before["steps"]) > 2


def test_remote_images_only_when_allowed(served, tmp_path):
    import functools
    import http.server
    import threading

    from fastapi.testclient import TestClient

    engine, app, srv, client = served
    img = noise_image(11)
    img.save(tmp_path / "remote.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/remote.png"
    body = {"model": "tiny-vlm", "max_tokens": 6, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]}
    try:
        with TestClient(create_app(engine, ServeSettings(allow_remote_images=True))) as tc:
            # the image is on loopback, which remote fetching refuses unless told otherwise
            r = tc.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "image_url_forbidden"
        settings = ServeSettings(allow_remote_images=True, allow_private_image_hosts=True)
        with TestClient(create_app(engine, settings)) as tc:
            r = tc.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
            want = engine.generate([Prompt.ask("what?", [img])], GenerationConfig(max_new_tokens=6))[0].text
            assert r.json()["choices"][0]["message"]["content"] == want
            body["messages"][0]["content"][0]["image_url"]["url"] = url.replace("remote.png", "absent.png")
            r = tc.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed"
    finally:
        httpd.shutdown()


def test_remote_fetches_refuse_private_hosts_other_schemes_and_redirects_to_them(served, monkeypatch):
    import http.server
    import ipaddress
    import threading

    from fastapi.testclient import TestClient

    from vistune.serve import images

    engine, app, srv, client = served
    img = noise_image(12)
    png = data_url(img).split(",", 1)[1]
    redirects = {"/to-self": "/img.png", "/to-loopback": "http://127.0.0.2:{port}/img.png",
                 "/to-metadata": "http://169.254.169.254/latest/meta-data/", "/to-lan": "http://10.1.2.3/img.png",
                 "/to-v6-loopback": "http://[::1]:{port}/img.png", "/to-file": "file:///etc/passwd",
                 "/to-ftp": "ftp://example.com/img.png", "/loop": "/loop"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/img.png":
                import base64

                raw = base64.b64decode(png)
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            elif self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path].format(port=self.server.server_address[1]))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    want = engine.generate([Prompt.ask("what?", [img])], GenerationConfig(max_new_tokens=6))[0].text

    def post(tc, url):
        r = tc.post("/v1/chat/completions", json={"model": "tiny-vlm", "max_tokens": 6, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what?"}]}]})
        return r.status_code, (r.json()["choices"][0]["message"]["content"] if r.status_code == 200
                               else r.json()["error"]["code"])

    forbidden = (400, "image_url_forbidden")
    try:
        with TestClient(create_app(engine, ServeSettings(allow_remote_images=True))) as tc:
            # By default loopback is refused however it is spelled, before anything is fetched.
            for url in (base + "/img.png", f"http://localhost:{httpd.server_address[1]}/img.png",
                        "http://[::1]:9/img.png", "http://169.254.169.254/latest/meta-data/"):
                assert post(tc, url) == forbidden, url
            # Now let the test server's own address count as public: a redirect from it to a
            # loopback, private or link-local host, or to another scheme, is still refused.
            real = images.forbidden_address
            monkeypatch.setattr(images, "forbidden_address",
                                lambda ip: ip != ipaddress.ip_address("127.0.0.1") and real(ip))
            assert post(tc, base + "/img.png") == (200, want)
            assert post(tc, base + "/to-self") == (200, want)  # a redirect to an allowed host is followed
            for path in ("/to-loopback", "/to-metadata", "/to-lan", "/to-v6-loopback", "/to-file", "/to-ftp"):
                assert post(tc, base + path) == forbidden, path
            assert post(tc, base + "/loop") == (400, "image_fetch_failed")  # too many redirects
        monkeypatch.undo()
        settings = ServeSettings(allow_remote_images=True, allow_private_image_hosts=True)
        with TestClient(create_app(engine, settings)) as tc:
            assert post(tc, base + "/to-self") == (200, want)
            assert post(tc, base + "/to-file") == forbidden  # other schemes stay refused even then
            assert post(tc, "http://[::1/img.png") == (400, "invalid_image_url")  # malformed, not a 500
    finally:
        httpd.shutdown()


def test_forbidden_addresses():
    import ipaddress

    from vistune.serve.images import forbidden_address

    for a in ("127.0.0.1", "127.9.9.9", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0",
              "100.64.0.1", "224.0.0.1", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"):
        assert forbidden_address(ipaddress.ip_address(a)), a
    for a in ("8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert not forbidden_address(ipaddress.ip_address(a)), a


def test_cli_serve_refuses_an_unset_api_key_variable(monkeypatch, capsys, tmp_path):
    from vistune.cli import main

    monkeypatch.delenv("VISTUNE_TEST_UNSET_KEY", raising=False)
    assert main(["serve", "--model", str(tmp_path), "--api-key-env", "VISTUNE_TEST_UNSET_KEY"]) == 2
    assert "VISTUNE_TEST_UNSET_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("why", ["repetition_penalty", "no_preallocated_cache"])
def test_a_request_that_cannot_join_is_not_starved_by_later_ones(served, why):
    """A request the running batch cannot take (a repetition penalty, which a batch started
    without one cannot add; or any newcomer when the engine does not preallocate its cache)
    must not wait behind every later request. Six clients keep more requests in flight than
    the batch holds, so without a bound the run never ends; with it, the set-aside request
    is answered before all but the few that start in its own batch."""
    import threading
    import time

    engine, app, srv, _ = served
    if why == "no_preallocated_cache":
        engine = Engine(engine.loaded, preallocate_cache=False)
    odd_extra = {"repetition_penalty": 1.3} if why == "repetition_penalty" else {}
    rows = 3
    local = create_app(engine, ServeSettings(max_batch_size=rows, batch_wait_ms=5, max_tokens_limit=64))
    later_finished: list[float] = []  # finish times of compatible requests sent after the odd one
    odd_sent = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()
    with LiveServer(local) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def feeder(k: int) -> None:
            n = 0
            while not stop.is_set():
                after = odd_sent.is_set()
                # staggered lengths, so the rows of the run never all finish at one step
                ask(client, f"count to ten ({k}.{n})", max_tokens=5 + 3 * k, temperature=0)
                if after:
                    with lock:
                        later_finished.append(time.monotonic())
                n += 1

        threads = [threading.Thread(target=feeder, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        flowing_by = time.monotonic() + 60
        while local.state.batcher.stats["requests"] < 8 and time.monotonic() < flowing_by:  # the stream flows
            time.sleep(0.01)
        odd_sent.set()
        done_at: list[float] = []

        def odd() -> None:
            ask(client, "say something new", max_tokens=6, extra_body=odd_extra)
            done_at.append(time.monotonic())

        t_odd = threading.Thread(target=odd, daemon=True)
        t_odd.start()
        deadline = time.monotonic() + 60  # plenty for a bounded wait, far less than 4096 requests
        while t_odd.is_alive() and time.monotonic() < deadline and len(later_finished) < 40:
            time.sleep(0.01)
        t_odd.join(0.5)
        stop.set()
        for t in threads:
            t.join(60)
    # it really arrived while a run was going and was set aside, so the test is not vacuous
    assert local.state.batcher.stats["set_aside"] >= 1
    assert done_at, f"the set-aside request was not answered while {len(later_finished)} later ones were"
    with lock:
        overtook = sum(t < done_at[0] for t in later_finished)
    # At most the requests started in the same batch as the odd one (rows - 1), plus one per
    # feeder that was sent just as the odd one was and raced it into the queue.
    assert overtook <= (rows - 1) + 6, overtook


def test_cli_serve_requires_the_key_from_the_named_variable(tokenizer, tmp_path, monkeypatch, capsys):
    """`vistune serve --api-key-env VAR` with VAR set: the app the CLI builds (its own
    settings code) refuses no key and a wrong key with 401 and answers the right one."""
    import uvicorn
    from fastapi.testclient import TestClient

    from vistune.cli import main

    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "cli-vlm")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.setenv("VISTUNE_TEST_KEY", "s3cret-from-env")
    assert main(["serve", "--model", str(path), "--api-key-env", "VISTUNE_TEST_KEY", "--port", "8123"]) == 0
    assert started["port"] == 8123 and "cli-vlm" in capsys.readouterr().out
    body = {"model": "cli-vlm", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(started["app"], base_url="http://localhost:8123") as tc:  # a loopback Host, as allowed
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}):
            r = tc.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert tc.get("/v1/models", headers=headers).status_code == 401
        good = {"Authorization": "Bearer s3cret-from-env"}
        r = tc.post("/v1/chat/completions", json=body, headers=good)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        assert [m["id"] for m in tc.get("/v1/models", headers=good).json()["data"]] == ["cli-vlm"]
