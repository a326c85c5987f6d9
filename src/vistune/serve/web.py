"""A Gradio page on the engine: upload an image, chat with streaming replies, clear.

Each browser session holds a `Chat`; its replies run through the server's batcher,
so page visitors and API clients share batches. An image is attached to the next
message when it changes in the upload box, and encoded once for the whole session; a
new image after the first starts a new conversation (the old picture would stay in
the model's context and mix into its answers).
"""
from __future__ import annotations

import hmac
import os

import gradio as gr
from fastapi import FastAPI

from ..infer.chat import Chat
from ..infer.engine import Engine, GenerationConfig, PromptError
from ..infer.image_cache import image_key
from .batching import Batcher

# System fonts only: the page must render without reaching Google Fonts.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


NEW_IMAGE = "(A new image: a new conversation starts here.)"


def make_respond(engine: Engine, streamer=None, config: GenerationConfig | None = None, system: str | None = None):
    """The page's send handler: (message, image, history, session) -> yields (history, session, '')."""
    config = config or GenerationConfig(max_new_tokens=256)
    streamer = streamer or engine.stream

    def respond(message: str, image, history: list | None, session: dict | None):
        history = list(history or [])
        message = (message or "").strip()
        if not message:
            yield history, session, ""
            return
        if session is None:
            session = {"chat": Chat(engine, system=system, config=config, streamer=streamer), "image": None}
        chat: Chat = session["chat"]
        if image is not None and image_key(image) != session["image"]:
            if session["image"] is not None or chat.turns:
                chat.reset()
                history = [{"role": "assistant", "content": NEW_IMAGE}]
            try:
                chat.attach(image)
            except PromptError as e:  # a text-only model takes no images
                yield history + [{"role": "user", "content": message}, {"role": "assistant", "content": f"⚠️ {e}"}], \
                    session, message
                return
            session["image"] = image_key(image)
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        try:
            for piece in chat.stream(message):
                history[-1]["content"] += piece
                yield history, session, ""
        except PromptError as e:
            history[-1]["content"] = f"⚠️ {e}"
        yield history, session, ""

    return respond


def build_web(engine: Engine, batcher: Batcher | None = None, config: GenerationConfig | None = None,
              system: str | None = None) -> gr.Blocks:
    respond = make_respond(engine, batcher.stream_sync if batcher is not None else None, config, system)

    def clear():
        return [], None, None, ""

    # No calls home from a local page unless the user's environment asks for them (gradio's default is on).
    analytics = os.environ.get("GRADIO_ANALYTICS_ENABLED") == "True"
    with gr.Blocks(title=f"vistune · {engine.name}", analytics_enabled=analytics) as demo:
        gr.Markdown(f"### vistune · `{engine.name}`")
        with gr.Row():
            image = gr.Image(type="pil", label="Image", elem_id="image", sources=["upload", "clipboard"], height=360)
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
                message = gr.Textbox(placeholder="Ask about the image, then press Enter", show_label=False,
                                     elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    reset = gr.Button("Clear", elem_id="clear")
        session = gr.State(None)
        for trigger in (send.click, message.submit):
            trigger(respond, [message, image, chatbot, session], [chatbot, session, message],
                    concurrency_limit=None)
        reset.click(clear, None, [chatbot, session, image, message])
    return demo


def mount_web(app: FastAPI, engine: Engine, batcher: Batcher | None, path: str = "/web",
              config: GenerationConfig | None = None, system: str | None = None,
              password: str | None = None) -> FastAPI:
    """Mount the page; with ``password`` (the server's API key) it asks for it in a login form."""
    auth = (lambda user, given: hmac.compare_digest(given.encode(), password.encode())) if password else None
    return gr.mount_gradio_app(app, build_web(engine, batcher, config, system), path=path, theme=THEME,
                               footer_links=[], auth=auth,
                               auth_message="Password: this server's API key (any user name)." if password else None)


def web_app(engine: Engine, config: GenerationConfig | None = None, system: str | None = None,
            max_batch_size: int = 16) -> FastAPI:
    """The page alone at / (`vistune web`)."""
    batcher = Batcher(engine, max_batch_size=max_batch_size)
    app = FastAPI(title="vistune web")
    return mount_web(app, engine, batcher, path="/", config=config, system=system)
