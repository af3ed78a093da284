"""Servers in child processes on loopback, for tests and benchmarks (no pytest import).

``free_port`` picks a port, ``wait_http`` polls a URL until it answers, ``stop`` ends a
process (a signal, then kill after a grace period), ``running`` does all three around a
``with`` block, and ``s3_server`` runs moto's S3 server that way.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    timeout: float = 60.0,
    proc: subprocess.Popen | None = None,
    ready: Callable[[int], bool] = lambda status: status < 500,
) -> None:
    """Poll ``url`` until its status satisfies ``ready`` (default: any answer but 5xx)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if ready(httpx.get(url, timeout=2).status_code):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig``; kill the process if it has not exited after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def running(
    args: list[str],
    ready_url: str,
    *,
    log: Path | None = None,
    timeout: float = 60.0,
    ready: Callable[[int], bool] = lambda status: status < 500,
    **popen: object,
) -> Iterator[subprocess.Popen]:
    """``sys.executable *args`` until the block ends, once ``ready_url`` answers."""
    out = Path(log).open("wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            **popen,  # type: ignore[call-overload]
        )
        try:
            wait_http(ready_url, timeout=timeout, proc=proc, ready=ready)
            yield proc
        finally:
            stop(proc)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in a child process on loopback until the block ends; yields its
    endpoint URL (any credentials are accepted: use dummy ones)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with running(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], endpoint):
        yield endpoint
