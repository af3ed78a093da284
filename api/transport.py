"""uvicorn's HTTP protocol with a request-header deadline and connection limits that answer
in problem+json (uvicorn has no header timeout, and its own ``limit_concurrency`` answers a
plain-text 503 without ``Retry-After``).

* Header deadline: a client must send a request's complete header block within
  ``header_timeout_s`` of opening the connection or of starting the request (its first byte);
  otherwise it gets 408 ``header-timeout`` and the connection is closed, so a client trickling
  headers (slowloris) cannot hold a connection.
* Connection limits: a connection past ``max_connections`` open connections in all, or past
  ``max_per_client`` from the same peer address, is answered 503 ``too-many-connections`` /
  ``too-many-client-connections`` with ``Retry-After`` as soon as it opens, and closed
  (after at most ``LINGER_S``, dropping what the client sends meanwhile).

Idle keep-alive connections are closed by uvicorn's own ``timeout_keep_alive``; bodies are
bounded by :mod:`api.middleware`. Built on uvicorn's httptools protocol, the one it picks when
httptools is installed (``litestar[standard]`` installs it).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.context import shutting_down

RETRY_AFTER_S = 1
"""What a refused client is told to wait: connections free up as requests end."""
LINGER_S = 2.0
"""How long a refused connection stays open for its client to read the answer."""


def raw_problem(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> bytes:
    """A complete HTTP/1.1 problem+json response that closes the connection."""
    body = json.dumps(
        {
            "type": f"urn:dandelion:problem:{code}",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            "code": code,
        },
        separators=(",", ":"),
    ).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/problem+json",
        "connection: close",
        f"content-length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_HEADER_TIMEOUT = raw_problem(408, "header-timeout", "the request headers did not arrive in time")


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the header deadline and the connection limits."""

    header_timeout_s: float = 10.0
    max_connections: int | None = None
    max_per_client: int | None = None
    per_client: ClassVar[Counter[str]] = Counter()
    """Open connections by peer address (one counter per server: see :func:`protocol_with_limits`)."""
    refused: ClassVar[Counter[str]] = Counter()
    """Connections refused, by problem code."""
    _header_timer: asyncio.TimerHandle | None = None
    _peer: str | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        self.per_client[self._peer] += 1
        refusal = self._refusal()
        if refusal is None:
            self._arm()
            return
        self.refused[refusal[0]] += 1
        self._refused = True
        transport.write(raw_problem(503, *refusal, headers={"Retry-After": str(RETRY_AFTER_S)}))
        # A lingering close: what the client sends meanwhile is read and dropped, so its
        # request does not reset the connection before it has read the answer.
        if transport.can_write_eof():
            transport.write_eof()
        self._header_timer = self.loop.call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def _refusal(self) -> tuple[str, str] | None:
        """(code, detail) when this connection is past a limit."""
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            return (
                "too-many-connections",
                f"the server has {self.max_connections:,} connections open (its limit); retry "
                "shortly",
            )
        assert self._peer is not None
        if self.max_per_client is not None and self.per_client[self._peer] > self.max_per_client:
            return (
                "too-many-client-connections",
                f"this client has {self.max_per_client:,} connections open (the limit per "
                "client); reuse one, or retry when one has closed",
            )
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer is not None:
            self.per_client[self._peer] -= 1
            if self.per_client[self._peer] <= 0:
                del self.per_client[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown reaches each connection: requests still waiting on a
        dependency are told (:data:`api.context.shutting_down`) and answer at once."""
        shutting_down.set()
        super().shutdown()

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
            self.transport.write(_HEADER_TIMEOUT)
            self.transport.close()


def protocol_with_limits(
    header_timeout_s: float,
    max_connections: int | None = None,
    max_per_client: int | None = None,
) -> type[Any]:
    """The protocol class to give uvicorn (``http=``): a header deadline of
    ``header_timeout_s``, at most ``max_connections`` open connections and
    ``max_per_client`` from one peer address (``None``: no limit)."""
    return type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "max_connections": max_connections,
            "max_per_client": max_per_client,
            "per_client": Counter(),
            "refused": Counter(),
        },
    )
