"""The FastAPI app: engine lifecycle, API-key check, request counting and OpenAI-shaped errors.

    app = create_app(llm, max_batch=8, context=4096, api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

The engine's step thread starts with the app and stops after the in-flight requests have finished
(uvicorn stops accepting connections on SIGTERM and waits for open requests; the lifespan then drains
the engine). Any exception in a handler becomes a 500 in OpenAI's error shape; the server stays up.

Request bodies are read in full before any handler runs, within `max_body_bytes` (413 past it, checked
on Content-Length first) and `body_timeout` seconds (408), so no handler waits on a slow client; the
time allowed for request headers is the connection's (herd.server.connection). A client that leaves
before its answer is ready is logged as one line.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from herd.chat.template import render_in_processes
from herd.engine import AsyncEngine, Engine, Metrics
from herd.errors import HerdError
from herd.images import MAX_BYTES, MAX_PIXELS
from herd.server.budget import InputBudget
from herd.server.images import ImageFetch, ImageSources
from herd.server.openai import APIError, Served, error_response, router
from herd.server.sse import ClientDisconnected

log = logging.getLogger("herd.server")

PROTECTED = ("/v1/", "/tokenize", "/detokenize")
MAX_BODY_BYTES = 8 << 20
MAX_IMAGES = 16  # images in one request
MAX_REQUEST_PIXELS = MAX_PIXELS  # decoded pixels of one request's images together: ~150 MB as RGB


@dataclass(frozen=True)
class Limits:
    """What one request may cost before a handler sees it (app.state.limits)."""

    max_body_bytes: int = MAX_BODY_BYTES
    header_timeout: float = 10.0  # seconds from a connection's first byte (or last response) to complete headers
    body_timeout: float = 60.0  # seconds for the whole body once the headers are in


def _chat_format(llm):
    """The model's chat format, or None for a template that does not compile (chat requests then get its 400)."""
    try:
        return llm.chat_format
    except HerdError:
        return None


def create_app(llm, *, max_batch: int = 8, context: int | None = None, max_queue: int | None = None,
               api_key: str | None = None, model_id: str | None = None, aliases=(),
               prefill_budget: int = 256, max_body_bytes: int = MAX_BODY_BYTES, header_timeout: float = 10.0,
               body_timeout: float = 60.0, kv_dtype=None, allow_image_urls: bool = False,
               image_url_max_bytes: int | None = None, image_url_timeout: float = 10.0,
               max_images: int = MAX_IMAGES, max_image_pixels: int = MAX_REQUEST_PIXELS) -> FastAPI:
    """An OpenAI-compatible app serving `llm` (a herd.api.LLM) with a continuous-batching engine of
    `max_batch` sequences of at most `context` tokens each (default: the model's context) and a waiting queue of
    `max_queue` requests (default 8 x max_batch) past which requests get 429. Bodies over `max_body_bytes`
    get 413, bodies slower than `body_timeout` seconds 408; `header_timeout` applies when the app is served
    through herd.server.uvicorn_config. `kv_dtype`: the KV cache's dtype (default
    herd.engine.runner.default_kv_dtype: fp16 on the quantized CPU path). Images come as data URLs in
    image_url parts, never as files on the server; `allow_image_urls` lets the server fetch http(s) ones too,
    each within `image_url_max_bytes` (default herd.images.MAX_BYTES) and `image_url_timeout` seconds. A
    request holds at most `max_images` images of `max_image_pixels` pixels together, checked from their
    headers before any is decoded. Input is prepared (tokenized, rendered, decoded) within an InputBudget of
    one body's worth at a time (herd.server.budget)."""
    context = context or llm.config.max_seq_len
    engine = Engine(llm.model, llm.tokenizer, max_batch=max_batch, context=context,
                    max_queue=max_queue if max_queue is not None else 8 * max_batch,
                    prefill_budget=prefill_budget, metrics=Metrics(), kv_dtype=kv_dtype)
    async_engine = AsyncEngine(engine)
    model_id = model_id or llm.checkpoint.path.stem

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:  # the model's own Jinja template renders in worker processes: a runaway cannot stall the server
            with render_in_processes(_chat_format(llm)):
                yield
        finally:
            async_engine.stop(drain=True)

    app = FastAPI(title="herd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    adapters = {name: i for i, name in enumerate(getattr(llm, "adapters", None) or {}, 1)}
    fetch = ImageFetch(image_url_max_bytes, image_url_timeout) if allow_image_urls else None
    app.state.served = Served(llm, async_engine, model_id, set(aliases) - {None}, context, adapters=adapters,
                              read_image=ImageSources(fetch, llm.max_image_bytes or MAX_BYTES),
                              max_images=max_images, max_image_pixels=max_image_pixels,
                              inputs=InputBudget(max_body_bytes))
    app.state.limits = limits = Limits(max_body_bytes, header_timeout, body_timeout)
    app.include_router(router)

    app.add_middleware(Gate, api_key=api_key, metrics=engine.metrics, limits=limits)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{err.get('msg', 'invalid')}" for err in errors[:5])
        return error_response(400, message or "invalid request", param=".".join(loc) or None)

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, e: ClientDisconnected):
        # An ordinary event (a closed tab, a client timeout): one line, no traceback. Nobody reads the
        # status; 499 (nginx's "client closed request") is what the request metrics count.
        log.info("client %s disconnected from %s before its response was ready",
                 "%s:%s" % request.client if request.client else "?", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal server error: {type(e).__name__}: {e}", "server_error",
                              code="internal_error")

    return app


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Gate:
    """ASGI middleware: the API-key check on PROTECTED paths, the body's size and time limits, and
    counting responses by status. (Plain ASGI rather than BaseHTTPMiddleware, which would buffer streams
    and hide disconnects.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics, limits: Limits = Limits()):
        self.app, self.api_key, self.metrics, self.limits = app, api_key, metrics, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = _endpoint(path)
        if self.api_key is not None and path.startswith(PROTECTED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                response = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                                          code="invalid_api_key")
                self.metrics.inc("herd_http_requests_total", endpoint=endpoint, status=401)
                return await response(scope, receive, send)
        try:
            body = await self._body(scope, receive)
        except _Refused as e:
            # the rest of the body is never read, so the connection cannot carry another request
            response = error_response(e.status, e.message, code=e.code)
            response.headers["connection"] = "close"
            self.metrics.inc("herd_http_requests_total", endpoint=endpoint, status=e.status)
            return await response(scope, receive, send)
        if body is None:  # the client left while sending
            self.metrics.inc("herd_http_requests_total", endpoint=endpoint, status=499)
            return
        status = [500]
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for http.disconnect

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, send_status)
        finally:
            self.metrics.inc("herd_http_requests_total", endpoint=endpoint, status=status[0])

    async def _body(self, scope, receive) -> bytes | None:
        """The whole request body, or None if the client disconnected; _Refused past a limit."""
        limit = self.limits.max_body_bytes
        too_large = _Refused(413, f"The request body is larger than this server's limit of {limit:,} bytes.",
                             "request_too_large")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            raise too_large
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise _Refused(408, f"The request body did not arrive within {self.limits.body_timeout:g} s.",
                               "request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body gives no length up front
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _endpoint(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics")
    for k in known:
        if path == k or path.startswith(k + "/"):
            return k
    return "other"
