"""The nox sessions the README documents for a user to start by hand (`serve`, `app`,
`review`, `lab`; `pipeline -- --help`), run as the README says, as the current user (root in
containers): each answers over HTTP on a free port, then stops on Ctrl-C or SIGTERM with a
clean exit and nothing left running. The web pages run their notebook in a kernel (slow)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import visit_cookies
from tests.conftest import ROOT
from tests.sessions.conftest import (
    assert_stopped_cleanly,
    free_port,
    nox_session,
    ready,
    session_env,
)


def notebook_title(name: str) -> str:
    return str(json.loads((ROOT / "dashboards" / name).read_text())["metadata"]["title"])


def page_title(html: str) -> str:
    match = re.search(r"<title>([^<]*)</title>", html)
    return match.group(1) if match else ""


def wait_kernel_ready(connection_file: Path) -> None:
    """Until the kernel answers (stopping one still starting interrupts its start-up).

    The client is not the kernel's manager, so it judges the kernel alive by its heartbeat,
    which by default counts one second without a reply as death. On a loaded machine a
    starting kernel can be that late; it is given 30 s."""
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=str(connection_file))
    client.load_connection_file()
    client.hb_channel.time_to_dead = 30.0
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
    finally:
        client.stop_channels()


def readiness_after_the_first_check(url: str, timeout: float = 60.0) -> httpx.Response:
    """``/health/ready`` once the API has asked the registry (at start it is checking)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(url)
        if "checking" not in answer.json().get("reason", "") or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def test_serve_answers_without_a_model_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`nox -s serve` on an empty work directory: alive, the OpenAPI document, and readiness
    reporting that there is no champion yet (no training here)."""
    port = free_port()
    env = session_env(tmp_path, DANDELION_API_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    with nox_session("serve", tmp_path, env=env) as session:
        ready(session, f"{base}/health/live")
        assert httpx.get(f"{base}/health/live").json() == {"status": "alive"}
        openapi = httpx.get(f"{base}/schema/openapi.json")
        assert openapi.status_code == 200
        assert "/predict" in openapi.json()["paths"]
        not_ready = readiness_after_the_first_check(f"{base}/health/ready")
        assert not_ready.status_code == 503
        assert not_ready.json() == {
            "status": "not_ready",
            "reason": "no version of model 'dandelion' has alias 'champion'",
        }
        status = session.interrupt()
    assert_stopped_cleanly(session, status, "Application shutdown complete")


def test_serve_stops_on_sigterm_to_the_session(tmp_path: Path) -> None:
    """A supervisor's SIGTERM to the `nox -s serve` process reaches the API itself."""
    port = free_port()
    env = session_env(tmp_path, DANDELION_API_PORT=str(port))
    with nox_session("serve", tmp_path, env=env) as session:
        ready(session, f"http://127.0.0.1:{port}/health/live")
        status = session.terminate()
    assert_stopped_cleanly(session, status, "Application shutdown complete")


def test_lab_starts_as_the_current_user_with_the_dandelion_kernel(tmp_path: Path) -> None:
    """`nox -s lab -- --port=P` (root included): JupyterLab on notebooks/, the `dandelion`
    kernel by default; a kernel started in it ends with the server on SIGTERM (without a
    terminal, Jupyter takes Ctrl-C for an abort and leaves its kernels to notice on their
    own; in a terminal it asks for confirmation, then stops as on SIGTERM)."""
    port = free_port()
    token = secrets.token_hex(16)
    env = session_env(tmp_path)
    args = (f"--port={port}", f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False")
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"token {token}"}
    with nox_session("lab", tmp_path, *args, env=env) as session:
        ready(session, f"{base}/api/status?token={token}")
        assert "started" in httpx.get(f"{base}/api/status", headers=auth).json()
        assert httpx.get(f"{base}/api/kernelspecs", headers=auth).json()["default"] == "dandelion"
        names = {
            c["name"] for c in httpx.get(f"{base}/api/contents", headers=auth).json()["content"]
        }
        assert "02_train.ipynb" in names
        lab_page = httpx.get(f"{base}/lab", headers=auth)
        assert lab_page.status_code == 200 and page_title(lab_page.text) == "JupyterLab"
        kernel = httpx.post(f"{base}/api/kernels", headers=auth, json={}, timeout=60)
        assert kernel.status_code == 201 and kernel.json()["name"] == "dandelion"
        wait_kernel_ready(tmp_path / "jupyter-runtime" / f"kernel-{kernel.json()['id']}.json")
        assert session.record_children(), "the kernel runs under the session"
        status = session.terminate()
    assert_stopped_cleanly(session, status, "Kernel shutdown")


@pytest.mark.slow
def test_app_page_renders_and_its_kernel_ends_with_the_session(tmp_path: Path) -> None:
    """`nox -s app` with the API down: the page (its notebook run in a kernel, past the visit
    gate) has the app's title; SIGTERM shuts the kernel down (without a terminal, Ctrl-C does not reach Voila's shutdown)."""
    port = free_port()
    env = session_env(
        tmp_path, DANDELION_APP_PORT=str(port), DANDELION_API_URL=f"http://127.0.0.1:{free_port()}"
    )
    base = f"http://127.0.0.1:{port}"
    with nox_session("app", tmp_path, env=env) as session:
        ready(session, f"{base}/health/live")
        page = httpx.get(f"{base}/", timeout=180, cookies=visit_cookies(base))
        assert page.status_code == 200
        assert page_title(page.text) == notebook_title("app.ipynb")
        assert httpx.get(f"{base}/health/live").json()["sessions"] == 1
        assert session.record_children(), "the page's kernel runs under the session"
        status = session.terminate()
    assert_stopped_cleanly(session, status, "Kernel shutdown")


@pytest.mark.slow
def test_review_page_renders_behind_its_token(tmp_path: Path) -> None:
    """`nox -s review` with DANDELION_REVIEW_TOKEN: no page without the token, the reviewer
    page with it; SIGTERM to the session shuts its kernel down."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = session_env(tmp_path, DANDELION_REVIEW_PORT=str(port), DANDELION_REVIEW_TOKEN=token)
    base = f"http://127.0.0.1:{port}"
    with nox_session("review", tmp_path, env=env) as session:
        ready(session, f"{base}/health/live")
        assert httpx.get(f"{base}/").status_code in (302, 403)
        page = httpx.get(f"{base}/?token={token}", timeout=180)
        assert page.status_code == 200
        assert page_title(page.text) == notebook_title("review.ipynb")
        assert session.record_children(), "the page's kernel runs under the session"
        status = session.terminate()
    assert_stopped_cleanly(session, status, "Kernel shutdown")


def test_pipeline_session_answers_help() -> None:
    """`nox -s pipeline -- --help`: the main job's options, without running it."""
    proc = subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py"), "-s", "pipeline", "--", "-h"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage: dandelion pipeline" in proc.stdout
    assert "--force-train" in proc.stdout
