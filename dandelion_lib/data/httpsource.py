"""The HTTP source: the reference URL layout ``<base>/<label>/<8-digit index>.jpg``.

Items are downloaded with a per-request timeout (the whole response), retried with
exponential backoff on 5xx, 429, timeouts and connection errors (never on 404/410) and asked
for conditionally (ETag/Last-Modified) on re-runs.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from dandelion_lib.core.config import Settings
from dandelion_lib.data.sources import (
    Fetched,
    FetchError,
    Source,
    SourceItem,
    default_source_name,
)


class HttpSource(Source):
    """``<base_url>/<label>/<8-digit index>.jpg`` for each label and index; its items' origin
    is ``origin`` (default: :func:`~dandelion_lib.data.sources.default_source_name`)."""

    RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

    def __init__(self, base_url: str, settings: Settings, origin: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.origin = origin or default_source_name(base_url)
        self.description = self.base_url
        self.settings = settings
        self.concurrency = max(1, settings.ingest.http_concurrency)
        count = settings.ingest.source_count
        if settings.ingest.max_per_class is not None:
            count = min(count, settings.ingest.max_per_class)
        self.indices = range(
            settings.ingest.source_start, settings.ingest.source_start + max(count, 0)
        )
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.ingest.http_timeout_s),
            limits=httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
            follow_redirects=True,
            headers={"User-Agent": "dandelion-ingest"},
        )

    def items(self) -> list[SourceItem]:
        return [
            SourceItem(label, f"{self.base_url}/{label}/{i:08d}.jpg", self.origin)
            for label in self.settings.labels
            for i in self.indices
        ]

    def close(self) -> None:
        self._client.close()

    def fetch(self, item: SourceItem, known: dict[str, Any] | None) -> Fetched:
        headers = _conditional_headers(known or {})
        retries = max(0, self.settings.ingest.http_retries)
        for attempt in range(retries + 1):
            try:
                return self._get(item.source, headers, conditional=bool(headers))
            except _Retryable as exc:
                if attempt == retries:
                    raise FetchError(exc.reason, exc.detail) from None
                delay = self.settings.ingest.http_backoff_s * (2**attempt)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, 30.0))
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, url: str, headers: dict[str, str], conditional: bool) -> Fetched:
        timeout = self.settings.ingest.http_timeout_s
        deadline = time.monotonic() + timeout
        try:
            with self._client.stream("GET", url, headers=headers) as resp:
                status = resp.status_code
                if status == 304 and conditional:
                    return Fetched(None, _validators(resp.headers), not_modified=True)
                _check_status(status, resp.headers)
                data = self._body(resp, deadline)
                return Fetched(data, _validators(resp.headers), resp.headers.get("content-type"))
        except httpx.TimeoutException:
            raise _Retryable("timeout", f"no complete response within {timeout:g} s") from None
        except httpx.TransportError as exc:
            raise _Retryable("connection_error", _one_line(exc)) from None

    def _body(self, resp: httpx.Response, deadline: float) -> bytes:
        """The response's bytes, at most ``max_download_bytes`` of them, before ``deadline``."""
        limit = self.settings.images.max_download_bytes
        chunks: list[bytes] = []
        size = 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise FetchError("too_large", f"more than {limit:,} bytes")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("response took too long")
            chunks.append(chunk)
        return b"".join(chunks)


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


def _check_status(status: int, headers: Any) -> None:
    """Raise for any answer but 200: 404/410 and other errors at once, 5xx/429 to retry."""
    if status in (404, 410):
        raise FetchError("not_found", f"HTTP {status}")
    if status in HttpSource.RETRY_STATUS:
        raise _Retryable("http_error", f"HTTP {status}", _retry_after(headers))
    if status != 200:
        raise FetchError("http_error", f"HTTP {status}")


def _conditional_headers(known: dict[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    if known.get("etag"):
        headers["If-None-Match"] = known["etag"]
    if known.get("last_modified"):
        headers["If-Modified-Since"] = known["last_modified"]
    return headers


def _validators(headers: Any) -> dict[str, Any]:
    out = {}
    if headers.get("etag"):
        out["etag"] = headers["etag"]
    if headers.get("last-modified"):
        out["last_modified"] = headers["last-modified"]
    return out


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("retry-after", ""))
    except ValueError:
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
