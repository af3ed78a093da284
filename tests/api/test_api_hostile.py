"""Cheap requests that must not take the API down, on a real ``python -m api`` process:
bursts of large-but-small-on-the-wire images (memory), slow connections on every route
(connections), and SIGINT while a reload hangs on the registry (shutdown).

The API runs with the glibc malloc settings of its image (``MALLOC_*``, docker/api.Dockerfile)
and its default decode budget; its RSS is read with psutil every 50 ms. The bounds asserted
are the container's (1 GiB) and what a client would wait, never timings.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from tests.api.conftest import ADMIN_TOKEN, Registry, api_env, start_api, stop_api
from tests.api.test_api_faults import HangingProxy
from tests.conftest import ROOT, free_port, wait_http

pytestmark = pytest.mark.faults

CONTAINER_LIMIT = 1024 * 2**20
"""The API's memory limit (k8s/base/api/deployment.yaml, compose.yaml)."""
CLIENT_WAIT_S = 60.0


def image_allocator_env() -> dict[str, str]:
    """The glibc malloc settings the API image sets."""
    text = (ROOT / "docker/api.Dockerfile").read_text()
    return dict(re.findall(r"\b(MALLOC_[A-Z_]+)=(\S+)", text))


@dataclass
class Api:
    url: str
    host: str
    port: int
    proc: Any
    workdir: Path


@contextlib.contextmanager
def api_process(workdir: Path, tracking_uri: str, **overrides: str) -> Iterator[Api]:
    port = free_port()
    env = api_env(workdir, port, tracking_uri, **image_allocator_env(), **overrides)
    proc = start_api(env, workdir / "server.log")
    api = Api(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc, workdir)
    try:
        wait_http(f"{api.url}/health/ready", timeout=180, proc=proc)
        yield api
    finally:
        stop_api(proc)


class PeakRss:
    """The highest RSS of a process, sampled every 50 ms while in the ``with`` block."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def zero_png(side: int) -> bytes:
    """An all-zero RGB PNG: ``side`` squared pixels in ~``side``**2 / 340 bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def burst(api: Api, image: bytes, n: int = 8) -> list[httpx.Response]:
    def send(_: int) -> httpx.Response:
        return httpx.post(
            f"{api.url}/predict",
            content=image,
            headers={"content-type": "image/png"},
            timeout=CLIENT_WAIT_S,
        )

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, range(n)))


# --- memory -----------------------------------------------------------------------------------
def test_a_burst_of_large_pngs_stays_within_the_container_limit(limited_api: Api) -> None:
    """8 concurrent 40 MP PNGs (116 KB each; 268 MiB each in memory when decoded in full)
    are refused from their header (over the pixel limit, which is quoted); 8 concurrent
    31 MP PNGs, just under it, are decoded at most as many at a time as the decode budget
    holds: each answers 200 or 503 decode-busy with Retry-After. RSS stays under 1 GiB."""
    over, under = zero_png(6300), zero_png(5600)
    assert len(over) < 150_000
    api = limited_api  # the default image limits and decode budget
    with PeakRss(api.proc.pid) as rss:
        before = rss.peak
        refused = burst(api, over)
        answered = burst(api, under)
        answered += burst(api, under)
    assert rss.peak < CONTAINER_LIMIT, f"peak RSS {rss.peak / 2**20:.0f} MiB"
    for r in refused:
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "image-too-large"
        assert "32,000,000" in r.json()["detail"]
    statuses = [r.status_code for r in answered]
    assert set(statuses) <= {200, 503}, [r.text for r in answered]
    assert 200 in statuses
    for r in answered:
        if r.status_code == 503:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "decode-busy"
            assert int(r.headers["retry-after"]) > 0
    print(f"RSS {before / 2**20:.0f} -> peak {rss.peak / 2**20:.0f} MiB; {sorted(statuses)}")


# --- connections ------------------------------------------------------------------------------
MAX_CONNECTIONS = 50
PER_CLIENT = 20
HEADER_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def limited_api(
    registry: Registry, champion: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """The API with low connection limits and short body and header deadlines."""
    with api_process(
        tmp_path_factory.mktemp("connections"),
        registry.tracking_uri,
        DANDELION_API_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        DANDELION_API_MAX_CONNECTIONS_PER_CLIENT=str(PER_CLIENT),
        DANDELION_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        DANDELION_BODY_READ_TIMEOUT_S="2",
        DANDELION_MIN_UPLOAD_BYTES_PER_S="1000",
    ) as api:
        yield api


def predict(api: Api, greenr_dir: Path) -> httpx.Response:
    image = (greenr_dir / "grass" / "00000000.jpg").read_bytes()
    return httpx.post(
        f"{api.url}/predict",
        content=image,
        headers={"content-type": "image/jpeg"},
        timeout=CLIENT_WAIT_S,
    )


@dataclass
class Reply:
    data: bytes
    closed: bool
    """The server closed the connection (else the client gave up after its 60 s)."""

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1]) if self.data.startswith(b"HTTP/1.1 ") else 0

    def header(self, name: str) -> str | None:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
        return None

    def problem(self) -> dict[str, Any]:
        assert self.header("content-type") == "application/problem+json", self.data[:300]
        return dict(json.loads(self.data.split(b"\r\n\r\n", 1)[1]))


def slow_body(api: Api, method: str, path: str, source: str) -> Reply:
    """Headers announcing a 1 MB body, then one byte every 0.5 s for up to 60 s."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
    )
    data = b""
    with socket.create_connection(
        (api.host, api.port), timeout=CLIENT_WAIT_S, source_address=(source, 0)
    ) as sock:
        sock.sendall(head.encode() + b"x")
        sock.settimeout(0.5)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(b"x")
                continue
            except OSError:
                return Reply(data, True)
            if not chunk:
                return Reply(data, True)
            data += chunk
    return Reply(data, False)


def test_slow_bodies_to_routes_that_ignore_them_hold_no_connection(
    limited_api: Api, greenr_dir: Path
) -> None:
    """60 connections trickle a 1 MB body (1 byte / 0.5 s) to `POST /nope` and
    `GET /health/live`, with 50 connections allowed, 20 per client: each is answered (404,
    200, or 503 problem+json past the per-client cap) and closed by the server, and
    /predict from another client answers 200 meanwhile."""
    api = limited_api
    with cf.ThreadPoolExecutor(64) as pool:
        slow = [
            pool.submit(slow_body, api, method, path, "127.0.0.2")
            for method, path in [("POST", "/nope"), ("GET", "/health/live")] * 30
        ]
        time.sleep(1.0)
        assert predict(api, greenr_dir).status_code == 200
        replies = [f.result() for f in slow]
    assert all(r.closed for r in replies), [r.data[:100] for r in replies if not r.closed]
    for (_, path), reply in zip(
        [("POST", "/nope"), ("GET", "/health/live")] * 30, replies, strict=True
    ):
        if reply.status == 503:
            assert reply.problem()["code"] == "too-many-client-connections"
            assert int(reply.header("retry-after") or 0) > 0
        else:
            assert reply.status == (404 if path == "/nope" else 200), reply.data[:300]
            assert reply.header("connection") == "close"
    assert sum(r.status in (200, 404) for r in replies) >= PER_CLIENT
    assert predict(api, greenr_dir).status_code == 200


def open_idle(api: Api, source: str, n: int) -> list[socket.socket]:
    return [
        socket.create_connection((api.host, api.port), timeout=10, source_address=(source, 0))
        for _ in range(n)
    ]


def refusal(sock: socket.socket) -> Reply | None:
    """The server's answer to a connection that sent nothing, if it came within 1 s."""
    sock.settimeout(1.0)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return Reply(data, False) if data else None
    except OSError:
        pass
    return Reply(data, True)


def test_connection_limits_answer_problem_json_with_retry_after(
    limited_api: Api, greenr_dir: Path
) -> None:
    """Past 20 connections from one address, and past 50 in all, a new connection gets 503
    problem+json with Retry-After (never uvicorn's plain text) and is closed; once the idle
    ones are cut off by the header deadline, /predict answers 200 again."""
    api = limited_api
    held = open_idle(api, "127.0.0.3", PER_CLIENT + 1)
    try:
        answers = [refusal(s) for s in held]
        refused = [a for a in answers if a is not None and a.status == 503]
        assert len(refused) == 1, [a.data[:200] for a in answers if a is not None]
        assert refused[0].problem()["code"] == "too-many-client-connections"
        assert int(refused[0].header("retry-after") or 0) > 0
        assert predict(api, greenr_dir).status_code == 200  # another client: unaffected
    finally:
        for s in held:
            s.close()

    held = [
        s for source in ("127.0.0.4", "127.0.0.5", "127.0.0.6") for s in open_idle(api, source, 20)
    ]
    try:
        over = predict(api, greenr_dir)
        assert over.status_code == 503, over.text
        assert over.headers["content-type"] == "application/problem+json"
        assert over.json()["code"] == "too-many-connections"
        assert int(over.headers["retry-after"]) > 0
        answers = [refusal(s) for s in held]
        refused = [a for a in answers if a is not None and a.status == 503]
        assert len(refused) >= 60 - MAX_CONNECTIONS
        for reply in refused:
            assert reply.problem()["code"] == "too-many-connections"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + CLIENT_WAIT_S
    while (status := predict(api, greenr_dir).status_code) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


# --- shutdown ---------------------------------------------------------------------------------
def test_sigint_during_a_hung_reload_answers_a_problem_not_a_500(
    registry: Registry, champion: str, tmp_path: Path
) -> None:
    """The registry hangs (a proxy that accepts and never answers) while an admin reload waits
    on it with the default deadline; SIGINT: the reload answers 503 problem+json, the process
    exits within the client's wait, and its log has no 500 and no traceback."""
    proxy = HangingProxy(registry.tracking_uri)
    try:
        with api_process(tmp_path, proxy.url, DANDELION_REGISTRY_TIMEOUT_S="10") as api:
            proxy.mode = "hang"
            with cf.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(
                    httpx.post,
                    f"{api.url}/admin/reload",
                    headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                    timeout=CLIENT_WAIT_S,
                )
                time.sleep(2.0)  # the reload waits on the hung registry
                assert not pending.done()
                api.proc.send_signal(signal.SIGINT)
                reply = pending.result()
                api.proc.wait(timeout=CLIENT_WAIT_S)
    finally:
        proxy.close()
    assert reply.status_code == 503, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["code"] in {"shutting-down", "reload-timeout"}
    assert int(reply.headers["retry-after"]) > 0
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    assert '"status": 500' not in log and "Exception in ASGI application" not in log
