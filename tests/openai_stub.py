"""An OpenAI-compatible chat-completions server on loopback for tests, with scripted
replies and faults. It runs in a thread of the test process (so a CLI subprocess can
talk to it too) and records every request it answers.

Images are recognised by a tag ``img<N>`` in their first caption, kinds by the
system message, so a script says: "image 3, reasoning: first a 429, then succeed".
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vistune.instruct.prompts import PROMPTS

USAGE = {"prompt_tokens": 100, "completion_tokens": 20}


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # None: a valid completion for the kind
    finish_reason: str = "stop"
    refusal: str | None = None
    delay: float = 0.0
    headers: dict = field(default_factory=dict)
    body: bytes | None = None  # sent as it is (a reply cut short, say) instead of the JSON payload


def good_completion(kind: str, image: int) -> str:
    if kind == "detail":
        return f"A cat with the number {image} on its collar sits on a mat beside a window.\n\nThe room is quiet."
    if kind == "reasoning":
        return (f"Question:\nWhy might cat {image} sit by the window?\n===\n"
                f"Answer:\nWindows are warm and show birds outside, so a cat enjoys watching from there.\n===")
    return (f"Question:\nWhat animal is this?\n===\nAnswer:\nIt is cat number {image}.\n===\n"
            "Question:\nWhere is it sitting?\n===\nAnswer:\nOn a mat near the window.\n===")


class StubLLM:
    def __init__(self, script: dict | None = None, delay: float = 0.0):
        # script: {(image, kind) or image: [Reply, ...]}: the n-th request gets the n-th
        # reply, the last one repeats.
        self.script = script or {}
        self.delay = delay
        self.lock = threading.Lock()
        self.requests: list[tuple[int, str]] = []
        self.seeds: dict[tuple[int, str], list] = {}  # the `seed` each request of a job sent
        self.inflight = 0
        self.max_inflight = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def counts(self) -> Counter:
        with self.lock:
            return Counter(self.requests)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.max_inflight = 0

    def __enter__(self) -> "StubLLM":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        msgs = body["messages"]
        kind = next(k for k, spec in PROMPTS.items() if msgs[0]["content"] == spec.system)
        image = int(re.search(r"\bimg(\d+)\b", msgs[-1]["content"]).group(1))
        with self.lock:
            self.requests.append((image, kind))
            self.seeds.setdefault((image, kind), []).append(body.get("seed"))
            n = self.requests.count((image, kind))
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        replies = self.script.get((image, kind)) or self.script.get(image) or [Reply()]
        reply = replies[min(n, len(replies)) - 1]
        try:
            time.sleep(self.delay + reply.delay)
            if reply.status != 200:
                payload = {"error": {"message": f"scripted {reply.status}", "type": "stub", "code": None}}
            else:
                payload = {
                    "id": f"chatcmpl-{image}-{kind}-{n}", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": reply.finish_reason, "message": {
                        "role": "assistant", "refusal": reply.refusal,
                        "content": good_completion(kind, image) if reply.content is None else reply.content}}],
                    "usage": {**USAGE, "total_tokens": sum(USAGE.values())},
                }
            data = json.dumps(payload).encode() if reply.body is None else reply.body
            h.send_response(reply.status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass
        finally:
            with self.lock:
                self.inflight -= 1
