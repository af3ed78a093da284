"""Who gets a Voila kernel, and what the others see: app sessions for browsers only.

A kernel costs about 90 MB and seconds of CPU, and Voila starts one per page load, so without
these rules ten plain ``curl`` requests would fill the session cap until the idle cull.

* **Visit gate** (the app page): a page load without the visit cookie gets a small page and no
  kernel; its script sets the cookie (a random visitor id, signed with the server's cookie
  secret) and loads the page again. A client that runs no JavaScript (``curl``, crawlers, link
  previews) never starts a kernel.
* **Per-visitor cap**: one visitor (one browser, by its visit cookie) holds at most
  ``max_per_visitor`` kernels. At that cap, a kernel of theirs whose tab has gone (its
  websocket closed) is shut down to make room, so reloading never locks anyone out.
* **Connect deadline**: a kernel whose page has not opened its websocket ``connect_timeout``
  seconds after the page was rendered is shut down (a script that ran the gate, a tab closed
  while loading). Real pages connect within a second or two of loading.
* **Queue page**: past either cap the answer is HTTP 503 with ``Retry-After`` and a page that
  tries again by itself every few seconds (no dead end).
"""

from __future__ import annotations

import asyncio
import html
import json
import secrets
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Float, Integer
from voila.tornado.handler import TornadoVoilaHandler

VISIT_COOKIE = "dandelion_visit"
VISIT_MAX_AGE_DAYS = 1
QUEUE_RETRY_S = 5
"""How often the queue page tries again (its ``Retry-After`` and its refresh)."""


@dataclass
class Visit:
    """One page load: who asked (None on pages without the gate) and the kernel it got."""

    visitor: str | None
    kernel_id: str | None = None


_VISIT: ContextVar[Visit | None] = ContextVar("dandelion_visit", default=None)


class AtCapacity(web.HTTPError):
    """No kernel for this page load now (HTTP 503): ``message`` says why, for the queue page."""

    def __init__(self, message: str) -> None:
        super().__init__(503, reason="The app is at capacity; try again shortly")
        self.message = message


class CappedKernelManager(AsyncMappingKernelManager):
    """The default kernel manager with a cap on kernels, a cap per visitor and a deadline for
    a page to connect (see the module's docstring).

    A kernel joins ``list_kernel_ids()`` only once its process has started (seconds), so
    kernels being started are counted too: the checks and the counts happen with no ``await``
    in between, on the one event loop, so concurrent page loads cannot all pass the check.
    """

    max_kernels = Integer(20, config=True, help="Most kernels running at once.")
    max_per_visitor = Integer(0, config=True, help="Most kernels per visitor (0: no cap).")
    connect_timeout = Float(
        0, config=True, help="Seconds after rendering for a page to connect (0: no deadline)."
    )
    starting: int = 0
    """Kernels being started (not listed yet)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.owners: dict[str, str] = {}  # kernel id -> visitor
        self.connected: set[str] = set()  # kernels whose page opened a websocket once
        self.pending: Counter[str] = Counter()  # kernels being started, per visitor
        self._deadlines: set[asyncio.Task[None]] = set()

    @property
    def sessions(self) -> int:
        """Kernels running or being started."""
        return len(self.list_kernel_ids()) + self.starting

    def held_by(self, visitor: str) -> list[str]:
        """The running kernels of ``visitor``, oldest first."""
        return [k for k, v in self.owners.items() if v == visitor and k in self]

    def notify_connect(self, kernel_id: str) -> None:
        super().notify_connect(kernel_id)  # type: ignore[no-untyped-call]
        self.connected.add(kernel_id)

    async def start_kernel(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        kernel_id = kwargs.get("kernel_id")
        if kernel_id is not None and kernel_id in self:
            return str(await super().start_kernel(*args, **kwargs))
        visit = _VISIT.get()
        visitor = visit.visitor if visit else None
        self._forget_gone()
        if visitor is not None:
            await self._make_room(visitor)
        self._check_caps(visitor)  # then no await until counted
        self.starting += 1
        if visitor is not None:
            self.pending[visitor] += 1
        try:
            started = str(await super().start_kernel(*args, **kwargs))
            if visitor is not None:
                self.owners[started] = visitor
            if visit is not None:
                visit.kernel_id = started
            return started
        finally:
            self.starting -= 1  # by now the kernel is listed (or failed to start)
            if visitor is not None:
                self.pending[visitor] -= 1

    def _check_caps(self, visitor: str | None) -> None:
        if visitor is not None and self.max_per_visitor > 0:
            mine = len(self.held_by(visitor)) + self.pending[visitor]
            if mine >= self.max_per_visitor:
                self.log.warning("refusing an app session: the visitor holds %d already", mine)
                raise AtCapacity(
                    f"This browser already has {mine} sessions of the app open, the most one "
                    "visitor may hold. Close a tab of the app and this one opens."
                )
        sessions = self.sessions
        if sessions >= self.max_kernels:
            self.log.warning("refusing a new app session: %d kernels running or starting", sessions)
            raise AtCapacity(
                f"The app is at capacity: all {self.max_kernels} sessions are in use. "
                "A session frees up when someone closes the app or leaves it idle."
            )

    async def _make_room(self, visitor: str) -> None:
        """At the visitor's cap, shut down a kernel of theirs whose tab has gone."""
        held = self.held_by(visitor)
        if self.max_per_visitor <= 0 or len(held) + self.pending[visitor] < self.max_per_visitor:
            return
        for kernel_id in held:
            if kernel_id in self.connected and self._kernel_connections.get(kernel_id, 0) == 0:
                self.log.info("replacing kernel %s: its tab has gone", kernel_id)
                self.owners.pop(kernel_id, None)
                await self.shutdown_kernel(kernel_id)  # type: ignore[no-untyped-call]
                return

    def _forget_gone(self) -> None:
        for kernel_id in [k for k in self.owners if k not in self]:
            del self.owners[kernel_id]
        self.connected &= set(self.list_kernel_ids())

    def expect_connection(self, kernel_id: str) -> None:
        """The page of ``kernel_id`` is rendered: shut the kernel down unless the page opens
        its websocket within ``connect_timeout`` seconds."""
        if self.connect_timeout <= 0 or kernel_id in self.connected:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.connect_timeout, self._schedule_deadline, kernel_id)

    def _schedule_deadline(self, kernel_id: str) -> None:
        task = asyncio.ensure_future(self._shut_down_unconnected(kernel_id))
        self._deadlines.add(task)
        task.add_done_callback(self._deadlines.discard)

    async def _shut_down_unconnected(self, kernel_id: str) -> None:
        if kernel_id not in self or kernel_id in self.connected:
            return
        self.log.info(
            "shutting down kernel %s: its page opened no websocket within %g s",
            kernel_id,
            self.connect_timeout,
        )
        self.owners.pop(kernel_id, None)
        try:
            await self.shutdown_kernel(kernel_id)  # type: ignore[no-untyped-call]
        except Exception:  # already gone (tab closed meanwhile), or a dead kernel
            self.log.debug("kernel %s was gone already", kernel_id, exc_info=True)


def _page(title: str, body: str, head: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{head}<title>{html.escape(title)}</title></head>"
        '<body style="font-family: sans-serif; margin: 3em auto; max-width: 36em; '
        f'padding: 0 1em; line-height: 1.5">{body}</body></html>\n'
    )


def gate_page(title: str, cookie: str) -> str:
    """The page served instead of the app to a browser without the visit cookie: its script
    sets ``cookie`` (``name=value; attributes``) and loads the page again."""
    script = (
        "<script>(function () {"
        f"var cookie = {json.dumps(cookie)};"
        'if (location.protocol === "https:") { cookie += "; Secure"; }'
        "document.cookie = cookie;"
        f"if (document.cookie.indexOf({json.dumps(VISIT_COOKIE + '=')}) >= 0) "
        "{ location.replace(location.href); }"
        'else { document.getElementById("msg").textContent = '
        '"This app needs cookies: allow them for this site and reload the page."; }'
        "})();</script>"
    )
    body = (
        '<p id="msg">Opening the app…</p>'
        "<noscript><p>This app needs JavaScript: turn it on and reload the page.</p></noscript>"
    )
    return _page(title, body + script)


def queue_page(title: str, message: str) -> str:
    """The page past a cap: why, and a refresh every ``QUEUE_RETRY_S`` seconds."""
    body = (
        "<h1>Please wait a moment</h1>"
        f"<p>{html.escape(message)}</p>"
        f"<p>This page tries again by itself every {QUEUE_RETRY_S} seconds: keep it open.</p>"
    )
    return _page(title, body, f'<meta http-equiv="refresh" content="{QUEUE_RETRY_S}">')


class GatedVoilaHandler(TornadoVoilaHandler):  # type: ignore[misc]  # voila is untyped
    """Voila's notebook page behind the visit gate (when ``gate``), answering the queue page
    past a cap, and giving each page's kernel its deadline to connect."""

    def initialize(self, **kwargs: Any) -> None:
        self.gate: bool = kwargs.pop("gate", False)
        self.page_title: str = kwargs.pop("page_title", "dandelion")
        super().initialize(**kwargs)

    @web.authenticated  # type: ignore[untyped-decorator,unused-ignore]
    async def get(self, path: str | None = None) -> None:
        if path:  # Voila redirects other paths to its file handler: no kernel
            await super().get(path)
            return
        visitor: str | None = None
        if self.gate:
            signed = self.get_signed_cookie(VISIT_COOKIE, max_age_days=VISIT_MAX_AGE_DAYS)
            if signed is None:
                self._write_gate()
                return
            visitor = signed.decode()
        visit = Visit(visitor)
        token = _VISIT.set(visit)
        try:
            await super().get(path)
        finally:
            _VISIT.reset(token)
            expect = getattr(self.kernel_manager, "expect_connection", None)
            if visit.kernel_id is not None and expect is not None:
                expect(visit.kernel_id)

    def _write_gate(self) -> None:
        value = self.create_signed_value(VISIT_COOKIE, secrets.token_urlsafe(12)).decode()
        max_age = VISIT_MAX_AGE_DAYS * 86400
        cookie = f"{VISIT_COOKIE}={value}; path={self.base_url}; max-age={max_age}; SameSite=Lax"
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(gate_page(self.page_title, cookie))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, AtCapacity):
            super().write_error(status_code, **kwargs)
            return
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Retry-After", str(QUEUE_RETRY_S))
        self.finish(queue_page(self.page_title, exc.message))
