"""uvicorn's HTTP protocol with a request-header deadline (uvicorn has no header timeout).

A client must send a request's complete header block within ``header_timeout_s`` of opening
the connection or of starting the request (its first byte); otherwise it gets 408
``header-timeout`` and the connection is closed, so a client trickling headers (slowloris)
cannot hold a connection. Idle keep-alive connections are closed by uvicorn's own
``timeout_keep_alive``. Built on uvicorn's httptools protocol, the one it picks when
httptools is installed (``litestar[standard]`` installs it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_BODY = (
    b'{"type":"urn:dandelion:problem:header-timeout","title":"Request Timeout","status":408,'
    b'"detail":"the request headers did not arrive in time","code":"header-timeout"}'
)
_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the header deadline (``header_timeout_s``)."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_RESPONSE)
            self.transport.close()


def protocol_with_header_timeout(timeout_s: float) -> type[Any]:
    """The protocol class to give uvicorn (``http=``) for a header deadline of ``timeout_s``."""
    return type(
        "HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s}
    )
