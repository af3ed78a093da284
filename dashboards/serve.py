"""Serve the web app with Voila, configured for production: ``python -m dashboards.serve``.

* Binds ``Settings.app_host:app_port`` (default 127.0.0.1:8866); the app calls the API at
  ``Settings.api_url``.
* Only ``dashboards/app.ipynb`` is served; no code is shown and tracebacks never reach the page.
* Each browser tab gets its own kernel, and only a browser does (:mod:`dashboards.visits`):
  a page load without the visit cookie gets a small page whose script sets it, so clients
  that run no JavaScript start no kernel. At most ``Settings.app_max_kernels`` kernels run or
  start at once, at most ``Settings.app_max_kernels_per_visitor`` per visitor (browser);
  past either cap the page is a queue page (HTTP 503, ``Retry-After``) that tries again by
  itself, also when page loads arrive together. A kernel whose page has not connected
  ``Settings.app_connect_timeout_s`` after rendering, or idle for
  ``Settings.app_cull_idle_s``, is shut down (the latter even while its tab is still open).
* ``/logout`` (there are no accounts) and malformed template static paths answer 404.
* Probes that start no kernel: ``GET /health/live`` (200 while the server runs) and
  ``GET /health/ready`` (503 while all sessions are taken). Probing ``/`` would start a kernel
  per probe.

``python -m dashboards.serve --review`` serves the reviewer page instead (an internal tool,
never on the public ingress), with the same machinery:

* only ``dashboards/review.ipynb``, on ``Settings.review_host:review_port`` (default
  127.0.0.1:8867);
* behind a token: ``Settings.review_token`` (``DANDELION_REVIEW_TOKEN``, at least 16
  characters); reviewers open ``http://<host>:8867/?token=<token>`` once (a cookie keeps them
  signed in). Without a token the page refuses to start (exit status 2, one line saying so).
  The token is handed to Voila in-process, not on a command line, and removed from the
  environment its kernels inherit (Voila still passes a page request's query string, so a
  ``?token=`` link's token, to that page's kernel, which runs only the page's own code).

Extra arguments are passed to Voila unchanged (e.g. ``--debug``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Bool
from voila.app import Voila
from voila.static_file_handler import TemplateStaticFileHandler
from voila.tornado.handler import TornadoVoilaHandler

from dandelion_lib.core.config import Settings, get_settings
from dashboards.visits import GatedVoilaHandler

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "dashboards" / "app.ipynb"
REVIEW_NOTEBOOK = ROOT / "dashboards" / "review.ipynb"
KERNEL = "dandelion"
MIN_TOKEN_LENGTH = 16
REVIEW_FLAG = "--review"


class ServeConfigError(ValueError):
    """The page cannot be served as configured (one line for the operator)."""


@dataclass(frozen=True)
class Page:
    """What one server serves: a notebook on an address, with or without a token."""

    name: str
    notebook: Path
    host: str
    port: int
    token: str | None = None


def app_page(settings: Settings) -> Page:
    """The end-user app: ``app.ipynb`` on ``app_host:app_port``, open to its users."""
    return Page("app", NOTEBOOK, settings.app.app_host, settings.app.app_port)


def review_page(settings: Settings) -> Page:
    """The reviewer page: ``review.ipynb`` on ``review_host:review_port``, behind
    ``review_token`` (:class:`ServeConfigError` when it is unset or too short)."""
    secret = (
        settings.review.review_token.get_secret_value().strip()
        if settings.review.review_token
        else ""
    )
    if not secret:
        raise ServeConfigError(
            "the reviewer page needs a token: set DANDELION_REVIEW_TOKEN (e.g. to the output "
            "of `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if len(secret) < MIN_TOKEN_LENGTH:
        raise ServeConfigError(
            f"DANDELION_REVIEW_TOKEN is too short: use at least {MIN_TOKEN_LENGTH} characters"
        )
    return Page(
        "review", REVIEW_NOTEBOOK, settings.review.review_host, settings.review.review_port, secret
    )


class HealthHandler(web.RequestHandler):
    """``/health/live`` and ``/health/ready`` (JSON, no kernel started)."""

    def initialize(self, kernel_manager: Any) -> None:
        self.kernel_manager = kernel_manager

    def get(self, probe: str) -> None:
        running = getattr(
            self.kernel_manager, "sessions", len(self.kernel_manager.list_kernel_ids())
        )
        cap = getattr(self.kernel_manager, "max_kernels", None)
        full = probe == "ready" and cap is not None and running >= cap
        self.set_status(503 if full else 200)
        self.set_header("Cache-Control", "no-store")
        self.finish(
            {"status": "at_capacity" if full else "ok", "sessions": running, "max_sessions": cap}
        )


class NotFoundHandler(web.RequestHandler):
    """404 for Jupyter pages the app does not have (``/logout``: there are no accounts;
    Jupyter's own handler fails rendering it, a 500)."""

    def get(self, *_args: Any) -> None:
        raise web.HTTPError(404)


class SafeTemplateStaticFileHandler(TemplateStaticFileHandler):  # type: ignore[misc]
    """Voila's template static files, answering 404 (not 500) for a path that is not
    ``<template>/static/<file>`` after normalisation (e.g. with encoded ``..`` segments)."""

    @staticmethod
    def _valid(path: str) -> bool:
        parts = os.path.normpath(path).split(os.path.sep, 2)
        return len(parts) == 3 and parts[1] == "static" and parts[0] not in ("", ".", "..")

    def parse_url_path(self, url_path: str) -> str:
        if not self._valid(url_path) or len(url_path.split("/", 2)) != 3:
            raise web.HTTPError(404)
        return str(super().parse_url_path(url_path))

    @classmethod
    def get_absolute_path(cls, root: str, path: str) -> str:
        if not cls._valid(path):
            raise web.HTTPError(404)
        return str(super().get_absolute_path(root, path))


class DandelionVoila(Voila):  # type: ignore[misc]  # voila has no type hints: Voila is Any
    """Voila plus the health endpoints (matched before Voila's catch-all notebook route),
    4xx instead of 500 on ``/logout`` and bad template static paths, and the notebook page of
    :class:`dashboards.visits.GatedVoilaHandler` (the visit gate when ``visit_gate``)."""

    visit_gate = Bool(False, config=True, help="Serve the page to browsers only.")

    def _page_handler(self, handler: Any) -> Any:
        """Voila's notebook route with our handler (the page's title for its own pages)."""
        if len(handler) != 3 or handler[1] is not TornadoVoilaHandler:
            return handler
        metadata = json.loads(Path(self.notebook_path).read_text()).get("metadata", {})
        title = str(metadata.get("title", "dandelion"))
        options = {**handler[2], "gate": self.visit_gate, "page_title": title}
        return (handler[0], GatedVoilaHandler, options)

    def init_handlers(self) -> list[Any]:
        health = (
            url_path_join(self.server_url, r"/health/(live|ready)"),
            HealthHandler,
            {"kernel_manager": self.kernel_manager},
        )
        logout = (url_path_join(self.server_url, r"/logout"), NotFoundHandler)
        static = (
            url_path_join(self.server_url, r"/voila/templates/(.*)"),
            SafeTemplateStaticFileHandler,
        )
        voila = [self._page_handler(h) for h in super().init_handlers()]
        return [health, logout, static, *voila]


def _kernel_path() -> list[str]:
    """JUPYTER_PATH entries that provide the ``dandelion`` kernel (created when missing)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
        return []
    except NoSuchKernel:
        pass
    base = Path(tempfile.mkdtemp(prefix="dandelion-jupyter-"))
    spec_dir = base / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (dandelion)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return [str(base)]


def _data_dir() -> dict[str, str]:
    """A writable Jupyter data dir (Voila writes its notebook-signing key there).

    With a read-only home (a hardened container) the default one is not writable, and the
    page would fail; a fresh temporary one is used instead.
    """
    from jupyter_core.paths import jupyter_data_dir

    path = Path(jupyter_data_dir())
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return {}
    except OSError:
        return {"JUPYTER_DATA_DIR": tempfile.mkdtemp(prefix="dandelion-jupyter-data-")}


def voila_argv(settings: Settings, page: Page | None = None) -> list[str]:
    """Voila's command-line arguments for the production configuration of ``page`` (default:
    the app). A token is never among them (a command line is visible to every local user)."""
    page = page or app_page(settings)
    return [
        str(page.notebook),
        "--no-browser",
        f"--Voila.ip={page.host}",
        f"--port={page.port}",
        "--Voila.port_retries=0",
        "--theme=light",
        "--template=lab",
        "--strip_sources=True",
        "--show_tracebacks=False",
        "--VoilaConfiguration.allow_template_override=NO",
        "--VoilaConfiguration.allow_theme_override=NO",
        "--VoilaConfiguration.multi_kernel_manager_class=dashboards.visits.CappedKernelManager",
        f"--CappedKernelManager.max_kernels={settings.app.app_max_kernels}",
        f"--CappedKernelManager.max_per_visitor={settings.app.app_max_kernels_per_visitor}",
        f"--CappedKernelManager.connect_timeout={settings.app.app_connect_timeout_s}",
        f"--DandelionVoila.visit_gate={page.name == 'app'}",
        f"--MappingKernelManager.cull_idle_timeout={settings.app.app_cull_idle_s}",
        f"--MappingKernelManager.cull_interval={max(1, min(60, settings.app.app_cull_idle_s // 2))}",
        "--MappingKernelManager.cull_connected=True",
        "--MappingKernelManager.cull_busy=False",
    ]


def environment(settings: Settings) -> dict[str, str]:
    """The environment Voila and its kernels run in: ``dashboards`` importable, our kernel."""
    env: dict[str, str] = {}
    pythonpath = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    extra = _kernel_path()
    if extra:
        jp = [*extra, *filter(None, os.environ.get("JUPYTER_PATH", "").split(os.pathsep))]
        env["JUPYTER_PATH"] = os.pathsep.join(jp)
    env["DANDELION_API_URL"] = settings.serving.api_url
    return env


def main(argv: list[str] | None = None) -> int:
    """Run Voila in this process until interrupted (``--review``: the reviewer page)."""
    args = list(sys.argv[1:] if argv is None else argv)
    review = REVIEW_FLAG in args
    args = [a for a in args if a != REVIEW_FLAG]
    settings = get_settings()
    try:
        page = review_page(settings) if review else app_page(settings)
    except ServeConfigError as exc:
        print(f"dandelion reviewer page not started: {exc}", file=sys.stderr, flush=True)
        return 2
    os.environ.update(_data_dir())  # first: the kernel lookup below depends on it
    os.environ.update(environment(settings))
    os.environ.pop("DANDELION_REVIEW_TOKEN", None)  # kernels inherit the environment
    base = f"http://{page.host}:{page.port}/"
    if review:
        print(
            f"dandelion reviewer page on {base}?token=<DANDELION_REVIEW_TOKEN> "
            "(internal: never expose it on the public ingress)",
            flush=True,
        )
    else:
        print(f"dandelion app on {base} (API {settings.serving.api_url})", flush=True)
    # All files of one selection arrive in one websocket message (tornado's default cap: 10 MiB).
    tornado_settings = {"websocket_max_message_size": settings.app.app_max_upload_bytes}
    extra: dict[str, Any] = {"token": page.token} if page.token else {}
    DandelionVoila.launch_instance(
        argv=[*voila_argv(settings, page), *args], tornado_settings=tornado_settings, **extra
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
