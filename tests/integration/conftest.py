"""A loopback HTTP server for the reference dataset, with injectable faults.

It serves ``<root>/<label>/<file>`` like the reference URL layout (with an ETag and
``If-None-Match`` → 304, as GitHub's raw file host does) and, per path, can instead answer
with a fault: 404, N x 5xx then success, a body dripped slower than the client's timeout,
a truncated JPEG, an HTML page with 200, a zero-byte file, or arbitrary bytes.
It stands in for the real remote host, which cannot be reached from the test machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@dataclass
class Fault:
    kind: str  # "404" | "5xx" | "slow" | "truncated" | "html" | "empty" | "bytes"
    times: int = 0  # for "5xx": how many failures before success (0: always fail)
    status: int = 500
    data: bytes = b""
    served: int = 0


@dataclass
class FaultServer:
    root: Path
    url: str = ""
    faults: dict[str, Fault] = field(default_factory=dict)
    delay_s: float = 0.0  # added to every response (to slow a whole run down)
    slow_s: float = 8.0  # how long a "slow" fault takes to send its body
    hits: Counter[str] = field(default_factory=Counter)
    statuses: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault(self, path: str, kind: str, **kw: object) -> None:
        self.faults[path.lstrip("/")] = Fault(kind, **kw)  # type: ignore[arg-type]

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.statuses.clear()

    def count(self, status: int) -> int:
        return sum(1 for _, s in self.statuses if s == status)


def _handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:  # noqa: C901 - one branch per fault
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg") -> None:
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            if status == 200 and self.headers.get("If-None-Match") == etag:
                status, body = 304, b""
            with server.lock:
                server.statuses.append((self.path, status))
            self.send_response(status)
            if status in (200, 304):
                self.send_header("ETag", etag)
            if status != 304:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            rel = self.path.lstrip("/")
            with server.lock:
                server.hits[rel] += 1
            if server.delay_s:
                time.sleep(server.delay_s)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._respond(rel)

        def _respond(self, rel: str) -> None:
            path = server.root / rel
            real = path.read_bytes() if ".." not in rel and path.is_file() else None
            fault = server.faults.get(rel)
            if fault is None:
                if real is None:
                    self._send(404, b"Not Found", "text/plain")
                else:
                    self._send(200, real)
                return
            fault.served += 1
            if fault.kind == "404":
                self._send(404, b"Not Found", "text/plain")
            elif fault.kind == "5xx":
                if fault.times == 0 or fault.served <= fault.times:
                    self._send(fault.status, b"Server Error", "text/plain")
                else:
                    self._send(200, real or b"")
            elif fault.kind == "truncated":
                assert real is not None
                self._send(200, real[: len(real) // 2])
            elif fault.kind == "html":
                self._send(
                    200, b"<!doctype html><html><body>Rate limited</body></html>", "text/html"
                )
            elif fault.kind == "empty":
                self._send(200, b"")
            elif fault.kind == "bytes":
                self._send(200, fault.data)
            elif fault.kind == "slow":
                body = real or b""
                with server.lock:
                    server.statuses.append((self.path, 200))
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                steps = 30
                step = max(1, len(body) // steps)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    time.sleep(server.slow_s / steps)
            else:  # pragma: no cover
                raise AssertionError(fault.kind)

    return Handler


@pytest.fixture
def http_source(greenr_dir: Path) -> Iterator[FaultServer]:
    """The reference dataset over loopback HTTP; configure faults with ``.fault(path, kind)``."""
    fs = FaultServer(root=greenr_dir)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fs))
    httpd.daemon_threads = True
    fs.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield fs
    finally:
        httpd.shutdown()
        httpd.server_close()
