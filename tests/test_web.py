"""The web page: its handler (streaming, one vision pass per image) and the page in headless Chromium."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_model, noise_image
from live_server import LiveServer

from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.model.checkpoint import LoadedModel
from vistune.serve.api import ServeSettings, create_app
from vistune.serve.web import make_respond

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CFG = GenerationConfig(max_new_tokens=12)


@pytest.fixture
def engine(tokenizer):
    return Engine(LoadedModel(*make_model(tokenizer)))


def test_handler_streams_and_encodes_each_image_once(engine):
    calls: list = []
    orig = engine.model.encode_images
    engine.model.encode_images = lambda px: (calls.append(px.shape[0]), orig(px))[1]
    respond = make_respond(engine, config=CFG)
    img = noise_image(4)
    steps = list(respond("what is in the image?", img, [], None))
    history, session, box = steps[-1]
    assert len(steps) > 2 and box == ""  # streamed in pieces; the text box is cleared
    first = engine.generate([Prompt.ask("what is in the image?", [img])], CFG)[0].text
    assert history == [{"role": "user", "content": "what is in the image?"}, {"role": "assistant", "content": first}]
    # The same picture still in the upload box is not attached (or encoded) again.
    history, session, _ = list(respond("and its color?", img, history, session))[-1]
    turns = [{"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": first},
             {"from": "human", "value": "and its color?"}]
    assert history[-1]["content"] == engine.generate([Prompt(turns, [img])], CFG)[0].text
    assert calls == [1]
    assert list(respond("   ", img, history, session))[-1][0] == history  # blank message: nothing happens


def alnum(s: str) -> str:
    return re.sub(r"\W", "", s)


@pytest.mark.browser
def test_page_in_headless_chromium(engine, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium, or `make browser`)")
    from playwright.sync_api import sync_playwright

    app = create_app(engine, ServeSettings(default_max_tokens=12), web=True)
    img = noise_image(9, (80, 60))
    img.save(tmp_path / "upload.png")
    expected = engine.generate([Prompt.ask("what is in the image?", [img])], CFG)[0].text
    ARTIFACTS.mkdir(exist_ok=True)
    with LiveServer(app) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(srv.url + "/web/")
            page.locator("#image input[type=file]").set_input_files(str(tmp_path / "upload.png"))
            page.wait_for_selector("#image img", timeout=30_000)
            page.locator("#message textarea").fill("what is in the image?")
            page.locator("#send").click()
            bot = page.locator("#chatbot [data-testid=bot]")
            bot.first.wait_for(timeout=30_000)
            page.wait_for_function(
                "want => { const b = document.querySelector('#chatbot [data-testid=bot]');"
                " return b && b.innerText.replace(/\\W/g, '').length >= want; }",
                arg=len(alnum(expected)), timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)
            assert page.locator("#chatbot [data-testid=user]").all_inner_texts() == ["what is in the image?"]
            assert alnum(bot.first.inner_text()) == alnum(expected)
            page.locator("#clear").click()
            page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=bot]')", timeout=15_000)
        finally:
            browser.close()
    assert (ARTIFACTS / "web_chat.png").stat().st_size > 1000


def test_web_app_serves_the_page_at_root(engine):
    from fastapi.testclient import TestClient

    from vistune.serve.web import web_app

    with TestClient(web_app(engine, CFG)) as tc:
        r = tc.get("/")
        assert r.status_code == 200 and "gradio" in r.text.lower()


def test_page_behind_the_api_key_asks_for_it(engine):
    from fastapi.testclient import TestClient

    with TestClient(create_app(engine, ServeSettings(api_key="sesame"), web=True)) as tc:
        assert tc.get("/web/config").status_code == 401
        assert tc.post("/web/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert tc.post("/web/login", data={"username": "me", "password": "sesame"}).status_code == 200
        assert tc.get("/web/config").status_code == 200


def test_a_new_image_mid_chat_starts_a_new_conversation(engine):
    respond = make_respond(engine, config=CFG)
    first, second = noise_image(4), noise_image(5)
    history, session, _ = list(respond("what is in the image?", first, [], None))[-1]
    history, session, _ = list(respond("and its color?", first, history, session))[-1]
    assert len(session["chat"].turns) == 4
    history, session, _ = list(respond("how many objects?", second, history, session))[-1]
    chat = session["chat"]
    assert [t["value"] for t in chat.turns][0] == "<image>\nhow many objects?" and len(chat.turns) == 2
    assert len(chat.image_embeds) == 1  # the first picture is gone from the context
    want = engine.generate([Prompt.ask("how many objects?", [second])], CFG)[0].text
    assert history[-2:] == [{"role": "user", "content": "how many objects?"}, {"role": "assistant", "content": want}]
    assert "new conversation" in history[0]["content"] and len(history) == 3
