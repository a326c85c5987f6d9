"""`vistune serve` (OpenAI-compatible API, optionally with the web page) and `vistune web`."""
from __future__ import annotations

import argparse
import os
import sys

from .infer import add_generation_args, add_model_args, load_engine


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible chat-completions server (add --web for the page at /web)")
    add_model_args(s)
    add_server_args(s)
    s.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require `Authorization: Bearer $VAR` on /v1 requests")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="also fetch http(s) image URLs (from public addresses only)")
    s.add_argument("--allow-private-image-hosts", action="store_true",
                   help="with --allow-remote-images: also from loopback and private addresses (link-local and "
                        "cloud metadata addresses stay closed unless named with --allow-image-host)")
    s.add_argument("--allow-image-host", action="append", default=[], metavar="ADDR[/BITS]",
                   help="with --allow-remote-images: fetch images from this address or network although it is "
                        "not public, link-local included (repeatable)")
    s.add_argument("--allowed-hosts", default=None, metavar="H1,H2",
                   help="host names a request's Host and Origin headers may name ('*': any; default: the "
                        "loopback names when --host is loopback, any otherwise)")
    s.add_argument("--model-name", default=None, help="model id clients send (default: directory name)")
    s.add_argument("--web", action="store_true", help="also serve the web page at /web")
    lim = s.add_argument_group("limits")
    lim.add_argument("--max-body-mb", type=float, default=20)
    lim.add_argument("--max-image-mb", type=float, default=10)
    lim.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    lim.add_argument("--max-images", type=int, default=8, help="images per request")
    lim.add_argument("--max-request-pixels", type=int, default=2 * 4096 * 4096,
                     help="pixels of all images of one request together")
    lim.add_argument("--max-decodes", type=int, default=2, help="image decodes in flight over all requests")
    lim.add_argument("--max-tokens", type=int, default=2048,
                     help="a request's max_tokens is clipped to this (and to what the context leaves)")
    lim.add_argument("--max-batch-size", type=int, default=16)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("web", help="the web chat page alone")
    add_model_args(w)
    add_server_args(w, port=7860)
    add_generation_args(w, 512)
    w.set_defaults(func=cmd_web)


def add_server_args(p: argparse.ArgumentParser, port: int = 8000) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--log-level", default="warning")


def _gradio_missing() -> bool:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web page needs gradio: pip install 'vistune[web]'", file=sys.stderr)
        return True
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.api import ServeSettings, create_app
    from ..serve.guard import LOOPBACK_NAMES, is_loopback

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: --api-key-env {args.api_key_env}: that environment variable is empty or unset",
                  file=sys.stderr)
            return 2
    if args.web and _gradio_missing():
        return 2
    from .. import runtime

    runtime.serving_process(web=args.web)  # before the engine starts threads: their freed memory can then be trimmed
    engine = load_engine(args)
    if args.allowed_hosts is not None:
        allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    else:
        allowed_hosts = list(LOOPBACK_NAMES) if is_loopback(args.host) else None
    try:
        settings = ServeSettings(
            model_name=args.model_name, api_key=api_key, allowed_hosts=allowed_hosts,
            allow_remote_images=args.allow_remote_images, allow_private_image_hosts=args.allow_private_image_hosts,
            allowed_image_hosts=list(args.allow_image_host),
            max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
            max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
            max_images_per_request=args.max_images, max_decodes_in_flight=args.max_decodes,
            max_tokens_limit=args.max_tokens, max_batch_size=args.max_batch_size,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(engine, settings, web=args.web)
    where = f"http://{args.host}:{args.port}"
    print(f"serving {app.state.model_id} at {where}/v1" + (f" and {where}/web" if args.web else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    if _gradio_missing():
        return 2
    from .. import runtime

    runtime.serving_process(web=True)
    from ..serve.web import web_app
    from .infer import generation_config

    app = web_app(load_engine(args), generation_config(args), args.system)
    print(f"web page at http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
