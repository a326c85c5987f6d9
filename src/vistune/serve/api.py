"""An OpenAI-compatible HTTP API on the engine: POST /v1/chat/completions, GET /v1/models, GET /health.

Messages map onto LLaVA turns: system/developer messages become the system text, user
messages human turns (an image part becomes an ``<image>`` placeholder where it
stands), assistant messages gpt turns. Every refusal is a 4xx with OpenAI's error
body ``{"error": {"message", "type", "param", "code"}}``, so clients raise their
usual exceptions.
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.engine import EncodedPrompt, Engine, GenerationConfig, Prompt, PromptError, PromptTooLong
from ..text.templates import IMAGE_PLACEHOLDER
from .batching import Batcher
from .images import RequestImageError, decode_data_url, fetch_remote, image_from_bytes, url_kind
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
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer <key>`
    allow_remote_images: bool = False
    # Remote images from loopback/private/link-local hosts too (an internal image store);
    # off, so that a request cannot make the server reach its own network.
    allow_private_image_hosts: bool = False
    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images_per_request: int = 8
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    default_temperature: float = 0.0  # absent `temperature` means greedy, as LLaVA evaluates
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0


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
    model_id = s.model_name or engine.name
    created = int(time.time())
    batcher = Batcher(engine, max_batch_size=s.max_batch_size, max_wait_s=s.batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="vistune", summary="OpenAI-compatible chat completions for a vistune model",
                  lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.settings, app.state.model_id = engine, batcher, s, model_id

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

    def check_key(request: Request) -> None:
        if not s.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), s.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key.", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        st = batcher.stats
        return {"status": "ok", "model": model_id, "waiting": batcher.waiting, **st,
                "mean_batch_size": round(st["row_steps"] / st["steps"], 2) if st["steps"] else 0.0}

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        check_key(request)
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}},
                  "required": True}})
    async def chat_completions(request: Request):
        check_key(request)
        req = _parse(await _read_body(request, s.max_body_bytes))
        if req.model != model_id:
            raise ApiError(404, f"The model {req.model!r} does not exist; this server serves {model_id!r}.",
                           type="not_found_error", param="model", code="model_not_found")
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        config = _generation_config(req, s)
        prompt = await _prompt(req, s)
        try:
            encoded: EncodedPrompt = await run_in_threadpool(engine.encode, prompt)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        except PromptError as e:
            raise ApiError(400, str(e), param="messages") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(batcher, encoded, config, cid, now, model_id, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            c = await batcher.complete(encoded, config)
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
    max_tokens = req.max_completion_tokens or req.max_tokens or min(s.default_max_tokens, s.max_tokens_limit)
    if max_tokens > s.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_tokens}, over this server's limit of {s.max_tokens_limit}",
                       param="max_tokens", code="max_tokens_exceeded")
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


async def _prompt(req: ChatCompletionRequest, s: ServeSettings) -> Prompt:
    n_images = sum(isinstance(p, ImagePart) for m in req.messages if isinstance(m.content, list) for p in m.content)
    if n_images > s.max_images_per_request:
        raise ApiError(400, f"{n_images} images in one request, over the limit of {s.max_images_per_request}",
                       param="messages", code="too_many_images")
    system: list[str] = []
    turns: list[dict] = []
    images = []
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
                images.append(await _image(part.image_url.url, s, where + ".image_url"))
                pieces.append(IMAGE_PLACEHOLDER)
                continue
            text = part if isinstance(part, str) else part.text
            if IMAGE_PLACEHOLDER in text:
                raise ApiError(400, f"text must not contain the reserved token {IMAGE_PLACEHOLDER}; "
                               "send images as image_url parts", param=where)
            pieces.append(text)
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
    return Prompt(turns, images, "\n".join(system) if system else None)


async def _image(url: str, s: ServeSettings, where: str):
    kind = url_kind(url)
    try:
        if kind == "data":
            raw = decode_data_url(url, s.max_image_bytes)
        elif kind == "remote" and s.allow_remote_images:
            raw = await fetch_remote(url, s.max_image_bytes, allow_private=s.allow_private_image_hosts)
        elif kind == "remote":
            raise RequestImageError("remote image URLs are disabled on this server (start it with "
                                    "--allow-remote-images); send a data: URL", code="remote_images_disabled")
        else:
            raise RequestImageError("image_url must be a data: URL (local paths and file: URLs are never read)",
                                    code="invalid_image_url")
        return await run_in_threadpool(image_from_bytes, raw, s.max_image_pixels)
    except RequestImageError as e:
        raise ApiError(e.status, str(e), param=where, code=e.code) from None


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
