"""The FastAPI app: engine lifecycle, API-key check, request counting and OpenAI-shaped errors.

    app = create_app(llm, max_batch=8, context=4096, api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

The engine's step thread starts with the app and stops after the in-flight requests have finished
(uvicorn stops accepting connections on SIGTERM and waits for open requests; the lifespan then drains
the engine). Any exception in a handler becomes a 500 in OpenAI's error shape; the server stays up.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from herd.engine import AsyncEngine, Engine, Metrics
from herd.server.openai import APIError, Served, error_response, router

log = logging.getLogger("herd.server")

PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def create_app(llm, *, max_batch: int = 8, context: int | None = None, max_queue: int | None = None,
               api_key: str | None = None, model_id: str | None = None, aliases=(),
               prefill_budget: int = 256) -> FastAPI:
    """An OpenAI-compatible app serving `llm` (a herd.api.LLM) with a continuous-batching engine of
    `max_batch` KV slots of `context` tokens each (default: the model's context) and a waiting queue of
    `max_queue` requests (default 8 x max_batch) past which requests get 429."""
    context = context or llm.config.max_seq_len
    engine = Engine(llm.model, llm.tokenizer, max_batch=max_batch, context=context,
                    max_queue=max_queue if max_queue is not None else 8 * max_batch,
                    prefill_budget=prefill_budget, metrics=Metrics())
    async_engine = AsyncEngine(engine)
    model_id = model_id or llm.checkpoint.path.stem

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.stop(drain=True)

    app = FastAPI(title="herd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = Served(llm, async_engine, model_id, set(aliases) - {None}, context)
    app.include_router(router)

    app.add_middleware(Gate, api_key=api_key, metrics=engine.metrics)

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


class Gate:
    """ASGI middleware: the API-key check on PROTECTED paths, and counting responses by status.
    (Plain ASGI rather than BaseHTTPMiddleware, which would buffer streams and hide disconnects.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

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
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.inc("herd_http_requests_total", endpoint=endpoint, status=status[0])


def _endpoint(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics")
    for k in known:
        if path == k or path.startswith(k + "/"):
            return k
    return "other"
