"""Serving a herd app with uvicorn, with a deadline on request headers.

    config = uvicorn_config(app, host="127.0.0.1", port=8000)
    uvicorn.Server(config).run()

uvicorn bounds idle keep-alive connections but not a request whose headers trickle in (slowloris), nor
a new connection that sends nothing: such a connection would stay open for as long as the client keeps
it. The protocol here closes a connection whose request headers are not complete `header_timeout`
seconds after it opened, or after the first byte of its next request; the body's own limits are the
app's (herd.server.app.Gate).
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("herd.server")


class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP/1.1 protocol (h11 or httptools) plus the header deadline. Both create a new
    request cycle the moment a request's headers are complete, which is how the deadline sees them."""

    header_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._deadline is None and (cycle is None or cycle.response_complete):
            self._arm()  # the first bytes of the next request (uvicorn's keep-alive timeout covered the wait)
        super().data_received(data)
        if self.cycle is not cycle:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection from %s: request headers incomplete after %g s",
                     "%s:%s" % self.client if self.client else "?", self.header_timeout)
            self.transport.close()


def protocol(header_timeout: float) -> type:
    """The protocol class for uvicorn's `http` setting."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": header_timeout})


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> uvicorn.Config:
    """uvicorn settings for a herd app: its header deadline (app.state.limits), no access log."""
    limits = getattr(app.state, "limits", None)
    kwargs.setdefault("access_log", False)
    return uvicorn.Config(app, host=host, port=port, http=protocol(limits.header_timeout if limits else 10.0),
                          **kwargs)
