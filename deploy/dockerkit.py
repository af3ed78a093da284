"""Small helpers around the docker CLI shared by the image build, the image checks and the
rehearsal: engine detection, offline wheelhouse serving, image names, waiting for HTTP."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Wheelhouse and base root filesystems, shared by every checkout on the machine (CI clones anew).
_XDG = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE = Path(os.environ.get("DANDELION_DOCKER_CACHE", _XDG / "dandelion" / "docker")).resolve()
PROJECT_IMAGES = ("api", "app", "pipeline", "mlflow")
STAND_INS_IMAGE = "dandelion-rehearsal/stand-ins:local"
# The wheelhouse index's loopback port. Fixed, because the index URL reaches the builds as a
# build argument, which is part of each RUN layer's cache key: a new port per run would rebuild
# the TensorFlow/Airflow layers every time although the lock did not change.
INDEX_PORT = 38471


class StepFailed(RuntimeError):
    """A check or rehearsal step did not pass."""


def image_tag(name: str) -> str:
    """The tag compose.yaml gives a project image (same defaults, same variables)."""
    registry = os.environ.get("IMAGE_REGISTRY", "ghcr.io/dandelion")
    return f"{registry}/dandelion-{name}:{os.environ.get('IMAGE_TAG', '0.1.0')}"


def docker(
    *args: str, check: bool = True, capture: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `docker ARGS`; on failure raise StepFailed with the tail of its output."""
    env = {**os.environ, "DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "0")}
    proc = subprocess.run(
        ["docker", *args],
        capture_output=capture,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:]
        raise StepFailed(f"docker {' '.join(args[:3])} ... exited {proc.returncode}\n{tail}")
    return proc


def engine_problem() -> str | None:
    """None when a Docker engine answers; otherwise a one-line reason."""
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no docker CLI or engine ({exc})"
    if proc.returncode != 0:
        return (
            "no Docker engine reachable (" + (proc.stderr.strip().splitlines() or ["?"])[-1] + ")"
        )
    return None


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def _project(filename: str) -> str:
    """Normalized project name of a wheel file (PEP 503)."""
    return re.sub(r"[-_.]+", "-", filename.split("-", 1)[0]).lower()


class _IndexHandler(http.server.SimpleHTTPRequestHandler):
    """A folder of wheels as a PEP 503 simple index: /simple/<project>/ lists its wheels."""

    def do_GET(self) -> None:
        parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
        if parts and parts[0] == "simple":
            folder = Path(str(self.directory))
            wanted = parts[1].lower() if len(parts) > 1 else None
            names = sorted(f.name for f in folder.glob("*.whl"))
            if wanted is None:
                links = sorted({_project(n) for n in names})
                body = "".join(f'<a href="/simple/{n}/">{n}</a>\n' for n in links)
            else:
                files = [n for n in names if _project(n) == wanted]
                if not files:
                    self.send_error(404)
                    return
                body = "".join(f'<a href="/{n}">{n}</a>\n' for n in files)
            data = f"<!DOCTYPE html><html><body>\n{body}</body></html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients closing early (range requests, aborted downloads) are not errors here


@contextmanager
def serve_index(folder: Path) -> Iterator[str]:
    """Serve a wheel folder as a simple index on loopback; yields the index URL."""
    handler = functools.partial(_IndexHandler, directory=str(folder))
    try:
        server = _QuietServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError:  # taken (another build on this machine): any port, the builds then miss
        server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """HTTP status of GET url, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def wait_http(url: str, timeout_s: float, ok: Sequence[int] = (200,), what: str = "") -> float:
    """Wait until GET url answers one of `ok`; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if http_status(url) in ok:
            return time.monotonic() - start
        time.sleep(1.0)
    raise StepFailed(f"{what or url}: no {list(ok)} answer within {timeout_s:.0f} s")


def published_port(container: str, port: int) -> int:
    """The loopback host port docker published for a container port."""
    out = docker("port", container, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def container_logs(container: str, lines: int = 40) -> str:
    proc = docker("logs", "--tail", str(lines), container, check=False)
    return (proc.stdout or "") + (proc.stderr or "")


def compose_services() -> dict[str, Any]:
    """The services of compose.yaml (anchors and merge keys resolved by the YAML loader)."""
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services: dict[str, Any] = data["services"]
    return services


def inspect(container: str) -> dict[str, Any]:
    result: list[dict[str, Any]] = json.loads(docker("inspect", container).stdout)
    return result[0]
