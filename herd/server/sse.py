"""Server-Sent Events framing, and disconnect handling that frees the request's KV blocks at once.

SSEResponse sends `data: {json}\\n\\n` events and ends with `data: [DONE]`; it listens for the client's
http.disconnect while streaming and, when it comes, cancels the event generator right away (whose
`finally` aborts the engine requests) instead of waiting for the next write to fail.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


def event(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""


async def until_disconnect(request: Request, work: Awaitable) -> Any:
    """Await `work`, cancelling it if the client goes away first (then raises ClientDisconnected)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], status_code: int = 200):
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        sender = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            await self.events.aclose()
        if sender.done() and not sender.cancelled() and sender.exception() is not None \
                and not isinstance(sender.exception(), OSError):
            raise sender.exception()
