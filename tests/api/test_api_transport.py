"""Transport limits of the real API process (``python -m api``): a request body that stalls
or trickles, and headers that do not arrive in time, are answered 408 and the connection
closed (a slowloris client cannot hold a connection open indefinitely).

The server here has no model (its registry is an empty local one): the body is read before
the model is needed, which is all these tests exercise. Limits are set low (2 s grace,
1,000 bytes/s, 2 s for headers) so the clients below are cut off within seconds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import api_env, start_api, stop_api
from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.faults

GRACE_S = 2.0
MIN_RATE = 1000
HEADER_TIMEOUT_S = 2.0


def _read_rest(sock: socket.socket, answer: bytes) -> bytes:
    """``answer`` plus the rest of the reply, until the server closes (or 60 s pass: a
    failure in the caller's assertions)."""
    sock.settimeout(60)
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        answer += chunk
    return answer


@pytest.fixture(scope="module")
def strict_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    workdir = tmp_path_factory.mktemp("transport")
    port = free_port()
    env = api_env(
        workdir,
        port,
        f"sqlite:///{workdir / 'mlflow.db'}",
        DANDELION_BODY_READ_TIMEOUT_S=str(GRACE_S),
        DANDELION_MIN_UPLOAD_BYTES_PER_S=str(MIN_RATE),
        DANDELION_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    )
    proc = start_api(env, workdir / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health/live", timeout=180, proc=proc)
        yield "127.0.0.1", port
    finally:
        stop_api(proc)


def _slow_upload(
    address: tuple[str, int], declared: int, send: bytes, every_s: float
) -> tuple[bytes, float]:
    """Send headers declaring ``declared`` bytes, then ``send`` one byte per ``every_s``
    (then nothing); return what the server answered and when it closed the connection."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=60) as sock:
        head = (
            "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode())
        sock.settimeout(every_s)
        answer = b""
        for byte in send:
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:  # no answer yet: keep trickling
                continue
            except OSError:  # the server closed the connection
                break
            break  # an answer (or the server's close): stop sending
        return _read_rest(sock, answer), time.monotonic() - start


def test_a_trickling_upload_is_cut_off_with_408(strict_api: tuple[str, int]) -> None:
    """1 byte/s of a 100 kB body would take a day; it is cut off after the grace period."""
    answer, elapsed = _slow_upload(strict_api, 100_000, b"\xff" * 60, every_s=1.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body-timeout" in answer and b"too slowly" in answer
    assert elapsed < 30, elapsed  # cut off (grace 2 s), not after the 60 bytes sent


def test_a_body_shorter_than_its_content_length_is_cut_off(strict_api: tuple[str, int]) -> None:
    answer, elapsed = _slow_upload(strict_api, 5_000, b"", every_s=1.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < 30, elapsed


def test_a_normal_upload_is_unaffected(strict_api: tuple[str, int], greenr_dir: Path) -> None:
    image = (greenr_dir / "grass" / "00000021.jpg").read_bytes()
    host, port = strict_api
    r = httpx.post(
        f"http://{host}:{port}/predict",
        content=image,
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    # No model here: the body was read in full and the answer is about the model.
    assert r.status_code == 503 and r.json()["code"] == "model-unavailable", r.text


def _trickle_headers(address: tuple[str, int], text: bytes) -> tuple[bytes, float]:
    """Send ``text`` one byte per second (headers never completed); return the answer and
    when the server closed the connection."""
    start = time.monotonic()
    answer = b""
    with socket.create_connection(address, timeout=60) as sock:
        sock.settimeout(1.0)
        for byte in text:
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        return _read_rest(sock, answer), time.monotonic() - start


@pytest.mark.parametrize("sent", [b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" * 3, b""])
def test_headers_that_do_not_arrive_in_time_are_cut_off(
    strict_api: tuple[str, int], sent: bytes
) -> None:
    """Trickled headers (1 byte/s) or a silent connection: 408 within seconds."""
    answer, elapsed = _trickle_headers(strict_api, sent)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"header-timeout" in answer
    assert elapsed < 30, elapsed


def test_a_keep_alive_connection_serves_several_requests(strict_api: tuple[str, int]) -> None:
    """The header deadline is per request: a reused connection keeps working."""
    host, port = strict_api
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
        for _ in range(3):
            assert client.get("/health/live").status_code == 200
            time.sleep(HEADER_TIMEOUT_S / 2)
