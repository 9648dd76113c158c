"""The engine on a background thread, fed from asyncio: one step loop, one output queue per request.

`add` validates and queues synchronously (so the caller can answer 400 or 429 at once); the step
thread picks new requests and aborts up between steps. Outputs reach each request's asyncio.Queue
through its event loop's call_soon_threadsafe. `stop(drain=True)` lets running requests finish.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from herd.engine.engine import Engine
from herd.engine.request import QueueFull, Request, RequestOutput


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, object]] = []  # ("add", Request) / ("abort", request_id)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.max_queue = engine.scheduler.max_queue

    @property
    def metrics(self):
        return self.engine.metrics

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the step loop; with drain, only after every queued and running request has finished."""
        with self._cond:
            self._stopping = True
            if not drain:
                self._inbox += [("abort", rid) for rid in list(self._queues)]
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def pending(self) -> int:
        """Requests not yet running (queued here or in the scheduler)."""
        return sum(1 for kind, _ in self._inbox if kind == "add") + len(self.engine.scheduler.waiting)

    def add(self, request: Request, queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue a request from inside a running event loop; returns the queue its outputs arrive on
        (`queue` lets several requests share one)."""
        self.engine.validate(request)
        loop = asyncio.get_running_loop()
        queue = queue if queue is not None else asyncio.Queue()
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.pending() >= self.max_queue:
                raise QueueFull(f"{self.pending()} requests are already waiting (the queue holds {self.max_queue})")
            if request.request_id in self._queues:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            self._queues[request.request_id] = (loop, queue)
            self._inbox.append(("add", request))
            self._cond.notify()
        return queue

    def abort(self, request_id: str) -> None:
        with self._cond:
            if self._queues.pop(request_id, None) is not None:
                self._inbox.append(("abort", request_id))
                self._cond.notify()

    def submit(self, *requests: Request) -> asyncio.Queue:
        """Queue the requests, all or none (QueueFull and validation errors raise before anything runs);
        their outputs arrive interleaved on the returned queue. Read it with `outputs`."""
        queue: asyncio.Queue = asyncio.Queue()
        added: list[str] = []
        try:
            for request in requests:
                self.add(request, queue)
                added.append(request.request_id)
        except BaseException:
            for request_id in added:
                self.abort(request_id)
            raise
        return queue

    async def outputs(self, queue: asyncio.Queue, requests: list[Request]) -> AsyncIterator[RequestOutput]:
        """The submitted requests' outputs until all finish; leaving early (cancel, disconnect) aborts them."""
        live = {r.request_id for r in requests}
        try:
            while live:
                out = await queue.get()
                if out.finished:
                    live.discard(out.request_id)
                yield out
        finally:
            for request_id in live:
                self.abort(request_id)

    async def generate(self, *requests: Request) -> AsyncIterator[RequestOutput]:
        """submit + outputs in one call."""
        async for out in self.outputs(self.submit(*requests), list(requests)):
            yield out

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not engine.has_work() and not self._stopping:
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                if self._stopping and not inbox and not engine.has_work():
                    return
            for kind, item in inbox:
                if kind == "abort":
                    engine.abort(item)
                    continue
                try:
                    engine.add_request(item)
                except Exception as e:  # raced past the checks in add(): report instead of dying
                    self._deliver(RequestOutput(item.request_id, finish_reason="error", error=str(e)))
            try:
                outputs = engine.step()
            except Exception as e:  # a bug outside the runner: fail what was running, keep serving
                outputs = engine.fail_all(f"{type(e).__name__}: {e}")
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        with self._cond:
            target = self._queues.get(out.request_id)
            if target is not None and out.finished:
                del self._queues[out.request_id]
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
