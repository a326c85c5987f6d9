"""An OpenAI-compatible HTTP API on the engine: POST /v1/chat/completions, GET /v1/models, GET /health.

Messages map onto LLaVA turns: system/developer messages become the system text, user
messages human turns (an image part becomes an ``<image>`` placeholder where it
stands), assistant messages gpt turns. Every refusal is a 4xx with OpenAI's error
body ``{"error": {"message", "type", "param", "code"}}``, so clients raise their
usual exceptions.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import runtime
from ..infer.engine import (EncodedPrompt, Engine, GenerationConfig, ImagesNotSupported, Prompt, PromptError,
                            PromptTooLong)
from ..text.templates import IMAGE_PLACEHOLDER
from .batching import Batcher
from .guard import Guard, GuardSettings
from .idle import IdleTrim
from .images import RequestImageError, decode_data_url, fetch_remote, image_from_bytes, image_size, url_kind
from .schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    ImagePart,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
)


@dataclass
class ServeSettings:
    model_name: str | None = None  # the id clients send as `model`; defaults to the model directory's name
    api_key: str | None = None  # when set, every path but /health needs `Authorization: Bearer <key>`
    # Host names a request's Host and Origin may name (None: any); the CLI sets loopback names on loopback.
    allowed_hosts: list[str] | None = None
    allow_remote_images: bool = False
    # Remote images from loopback/private hosts too (an internal image store);
    # off, so that a request cannot make the server reach its own network.
    allow_private_image_hosts: bool = False
    # Addresses or networks remote images may come from although non-public; the only way to
    # open link-local and cloud metadata addresses.
    allowed_image_hosts: list[str] = field(default_factory=list)
    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 2 * 4096 * 4096  # all images of one request together
    max_images_per_request: int = 8
    max_decodes_in_flight: int = 2  # image decodes at once, over all requests
    max_tokens_limit: int = 2048  # a larger max_tokens is clipped to it (and to what the context leaves)
    default_max_tokens: int = 256
    default_temperature: float = 0.0  # absent `temperature` means greedy, as LLaVA evaluates
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    idle_trim_s: float = 1.0  # idle this long after work, freed memory goes back to the OS

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_request_pixels",
                     "max_decodes_in_flight", "max_tokens_limit", "default_max_tokens", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeSettings.{name} must be >= 1, got {getattr(self, name)}")
        try:
            self.image_networks = [ipaddress.ip_network(h, strict=False) for h in self.allowed_image_hosts]
        except ValueError as e:
            raise ValueError(f"ServeSettings.allowed_image_hosts: {e}") from None


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(engine: Engine, settings: ServeSettings | None = None, *, web: bool = False) -> FastAPI:
    """The FastAPI app; ``web=True`` also mounts the Gradio page at /web on the same batcher."""
    s = settings or ServeSettings()
    # the server's process settings, also for an app built on an engine of the caller's
    runtime.serving_process(web=web)
    model_id = s.model_name or engine.name
    created = int(time.time())
    activity = IdleTrim(s.idle_trim_s, trim=runtime.release_freed_memory)
    batcher = Batcher(engine, max_batch_size=s.max_batch_size, max_wait_s=s.batch_wait_ms / 1000, activity=activity)
    decodes = Decodes(s.max_decodes_in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()
        activity.close()

    app = FastAPI(title="vistune", summary="OpenAI-compatible chat completions for a vistune model",
                  lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.settings, app.state.model_id = engine, batcher, s, model_id
    app.state.activity = activity
    # The page has its own login form (the same key); everything else needs the Bearer key.
    app.add_middleware(Guard, settings=GuardSettings(api_key=s.api_key, allowed_hosts=s.allowed_hosts,
                                                     own_auth_prefix="/web" if web else None))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(_from_validation(e.errors(), skip=1))

    @app.get("/health")
    async def health() -> dict:
        st = batcher.stats
        return {"status": "ok", "model": model_id, "waiting": batcher.waiting, **st,
                "mean_batch_size": round(st["row_steps"] / st["steps"], 2) if st["steps"] else 0.0,
                "memory_trims": activity.trims}

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}},
                  "required": True}})
    async def chat_completions(request: Request):
        body = await _read_body(request, s.max_body_bytes)
        with activity.busy():
            req = await run_in_threadpool(_parse, body)  # megabytes of JSON: not on the event loop
            if req.model != model_id:
                raise ApiError(404, f"The model {req.model!r} does not exist; this server serves {model_id!r}.",
                               type="not_found_error", param="model", code="model_not_found")
            if req.n != 1:
                raise ApiError(400, "only n=1 is supported", param="n")
            unsupported = req.unsupported()
            if unsupported:
                raise ApiError(400, f"{unsupported!r} is not supported by this server; leave it out",
                               param=unsupported, code="unsupported_parameter")
            config = _generation_config(req, s)
            draft = _draft(req, s)
            try:
                # Whether it can fit at all, before any image is decoded or any text tokenized.
                engine.check_size(len(draft.images), draft.chars)
                prompt = Prompt(draft.turns, await _images(draft.images, s, decodes, engine), draft.system)
                encoded: EncodedPrompt = await run_in_threadpool(engine.encode, prompt)
            except PromptTooLong as e:
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
            except ImagesNotSupported as e:
                raise ApiError(400, str(e), param=draft.images[0][1] if draft.images else "messages",
                               code="images_not_supported") from None
            except PromptError as e:
                raise ApiError(400, str(e), param="messages") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(batcher, encoded, config, cid, now, model_id, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            c = await _unless_disconnected(request, batcher.complete(encoded, config))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the row stopped at its next step
        except Exception as e:
            raise ApiError(500, f"generation failed: {e}", type="server_error") from None
        return ChatCompletion(
            id=cid, created=now, model=model_id,
            choices=[Choice(message=ResponseMessage(content=c.text), finish_reason=c.finish_reason)],
            usage=Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                        total_tokens=c.prompt_tokens + c.completion_tokens),
        )

    if web:
        from .web import mount_web

        # The page sits behind the same key: a login form asks for it.
        mount_web(app, engine, batcher, path="/web", password=s.api_key, config=GenerationConfig(
            max_new_tokens=s.default_max_tokens, temperature=s.default_temperature))
    return app


# -- request handling -------------------------------------------------------------
class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


T = TypeVar("T")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientGone as soon as the client disconnects: ``work`` is then
    cancelled, which cancels its batcher job (its row stops at the next decoding step)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # the body was read already: the next message is the disconnect

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()


class Decodes:
    """At most ``n`` image decodes at once over all requests: a burst of large images waits
    its turn instead of taking every core and a bitmap's worth of memory per image at once."""

    def __init__(self, n: int):
        self.n = n
        self._sem: asyncio.Semaphore | None = None

    @property
    def sem(self) -> asyncio.Semaphore:
        if self._sem is None:  # created on the server's loop, not at import
            self._sem = asyncio.Semaphore(self.n)
        return self._sem


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, over the limit of {limit}", code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise _from_validation(e.errors(), skip=0) from None


def _from_validation(errors: list, skip: int) -> ApiError:
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ())][skip:]
    param = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".") or None
    if err.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    if err.get("type") == "missing":
        return ApiError(400, f"missing required parameter: {param!r}", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid value for {param!r}: {err.get('msg')}", param=param, code="invalid_value")


def _generation_config(req: ChatCompletionRequest, s: ServeSettings) -> GenerationConfig:
    # Over the limit is clipped, as the context clips it (finish_reason "length"), as vLLM does.
    max_tokens = min(req.max_completion_tokens or req.max_tokens or s.default_max_tokens, s.max_tokens_limit)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "at most 4 stop sequences are allowed", param="stop")
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=s.default_temperature if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            repetition_penalty=req.repetition_penalty or 1.0,
            stop=stop,
            seed=req.seed,
        )
    except ValueError as e:  # the schema checks each field; this catches what it may miss, as a 400
        raise ApiError(400, str(e), code="invalid_value") from None


@dataclass
class Draft:
    """A request's conversation before its images are fetched and decoded."""

    turns: list[dict]
    system: str | None
    images: list[tuple[str, str]]  # (url, where in the request)
    chars: int  # of text, for the size bound


def _draft(req: ChatCompletionRequest, s: ServeSettings) -> Draft:
    n_images = sum(isinstance(p, ImagePart) for m in req.messages if isinstance(m.content, list) for p in m.content)
    if n_images > s.max_images_per_request:
        raise ApiError(400, f"{n_images} images in one request, over the limit of {s.max_images_per_request}",
                       param="messages", code="too_many_images")
    system: list[str] = []
    turns: list[dict] = []
    images: list[tuple[str, str]] = []
    chars = 0
    for i, m in enumerate(req.messages):
        parts = [m.content] if isinstance(m.content, str) else (m.content or [])
        if not parts:
            raise ApiError(400, f"message {i} has no content", param=f"messages[{i}].content")
        pieces: list[str] = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}]")
            if isinstance(part, ImagePart):
                if m.role != "user":
                    raise ApiError(400, f"images are accepted in user messages only, not {m.role}", param=where)
                images.append((part.image_url.url, where + ".image_url"))
                pieces.append(IMAGE_PLACEHOLDER)
                continue
            text = part if isinstance(part, str) else part.text
            if IMAGE_PLACEHOLDER in text:
                raise ApiError(400, f"text must not contain the reserved token {IMAGE_PLACEHOLDER}; "
                               "send images as image_url parts", param=where)
            pieces.append(text)
            chars += len(text)
        value = "\n".join(pieces)
        if m.role in ("system", "developer"):
            system.append(value)
            continue
        role = "human" if m.role == "user" else "gpt"
        if turns and turns[-1]["from"] == role:
            turns[-1]["value"] += "\n" + value  # consecutive messages of one role are one turn
        else:
            turns.append({"from": role, "value": value})
    if not turns or turns[-1]["from"] != "human":
        raise ApiError(400, "the last message must be from the user", param="messages")
    if turns[0]["from"] != "human":
        raise ApiError(400, "the conversation must start with a user message", param="messages")
    return Draft(turns, "\n".join(system) if system else None, images, chars)


async def _images(urls: list[tuple[str, str]], s: ServeSettings, decodes: Decodes, engine: Engine) -> list:
    """Fetch every image, check every size from its header, then decode them one slot at a time."""
    raws, total = [], 0
    for url, where in urls:
        try:
            raw = await _image_bytes(url, s)
            w, h = image_size(raw, s.max_image_pixels)
        except RequestImageError as e:
            raise ApiError(e.status, str(e), param=where, code=e.code) from None
        total += w * h
        if total > s.max_request_pixels:
            raise ApiError(400, f"the request's images come to over {s.max_request_pixels} pixels (this one is "
                           f"{w}x{h}); send fewer or smaller images", param=where, code="image_too_large")
        raws.append((raw, where))
    images = []
    for raw, where in raws:
        try:
            async with decodes.sem:
                images.append(await run_in_threadpool(_pixels, engine, raw, s.max_image_pixels))
        except RequestImageError as e:
            raise ApiError(e.status, str(e), param=where, code=e.code) from None
    return images


def _pixels(engine: Engine, raw: bytes, max_pixels: int):
    """The model's input pixels: resized here, in the request's thread, so the engine thread never
    resizes a large bitmap between decoding steps, and the bitmap is freed at once."""
    return engine.loaded.pixels(image_from_bytes(raw, max_pixels))


async def _image_bytes(url: str, s: ServeSettings) -> bytes:
    kind = url_kind(url)
    if kind == "data":
        return decode_data_url(url, s.max_image_bytes)
    if kind == "remote" and s.allow_remote_images:
        return await fetch_remote(url, s.max_image_bytes, allow_private=s.allow_private_image_hosts,
                                  allowed=s.image_networks)
    if kind == "remote":
        raise RequestImageError("remote image URLs are disabled on this server (start it with "
                                "--allow-remote-images); send a data: URL", code="remote_images_disabled")
    scheme = url.split(":", 1)[0][:16] if ":" in url[:17] else None
    if s.allow_remote_images:
        what = f"{scheme}: URLs are not fetched" if scheme else "local paths are never read"
        raise RequestImageError(f"image_url must be a data: URL or an http(s) URL ({what})",
                                code="invalid_image_url")
    raise RequestImageError("image_url must be a data: URL (local paths and file: URLs are never read)",
                            code="invalid_image_url")


async def _sse(batcher: Batcher, encoded: EncodedPrompt, config: GenerationConfig, cid: str, created: int,
               model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices: bool = True) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=model, usage=usage,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])
        return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

    yield chunk(Delta(role="assistant", content=""))
    async for kind, payload in batcher.events(encoded, config, stream=True):
        if kind == "text":
            yield chunk(Delta(content=payload))
        elif kind == "done":
            yield chunk(Delta(), finish=payload.finish_reason)
            if include_usage:
                u = Usage(prompt_tokens=payload.prompt_tokens, completion_tokens=payload.completion_tokens,
                          total_tokens=payload.prompt_tokens + payload.completion_tokens)
                yield chunk(Delta(), usage=u, choices=False)
        else:
            err = ApiError(500, f"generation failed: {payload}", type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
    yield "data: [DONE]\n\n"
