"""Sources in an S3 bucket (AWS S3, MinIO or any S3-protocol server).

* :class:`S3Source`: ``s3://bucket/prefix`` with one key prefix per label,
  ``<prefix>/<label>/<file>`` (the layout of a local folder source);
* :class:`S3NegativesSource`: ``s3://bucket/prefix`` of photos that are neither class, one key
  prefix per kind, ``<prefix>/<kind>/<file>``, labelled ``unknown``.

Both read through :class:`~dandelion_lib.core.storage.S3Store`, with the store's endpoint and
region settings (``DANDELION_S3_ENDPOINT_URL``, ``DANDELION_S3_REGION``) and the usual AWS
credentials of the environment. The listing is paginated (1000 keys a request); each item
remembers the size and ETag it was listed with, so a re-run reads no unchanged object again,
and an object larger than ``max_download_bytes`` is refused from its listed size, its body
never read beyond that limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

from dandelion_lib.core.config import Settings
from dandelion_lib.core.labels import UNKNOWN
from dandelion_lib.core.storage import (
    ListedObject,
    ObjectNotFoundError,
    ObjectTooLargeError,
    S3Store,
    StoreError,
)
from dandelion_lib.data.rejections import IngestError, SourceUnavailableError
from dandelion_lib.data.sources import (
    NEGATIVES_ORIGIN,
    Fetched,
    FetchError,
    Source,
    SourceItem,
    default_source_name,
)


def _hidden(relative: str) -> bool:
    """A folder marker (``…/``), or a key with a hidden part (``.…``) below the prefix."""
    parts = relative.split("/")
    return relative.endswith("/") or any(p.startswith(".") or not p for p in parts)


class S3Source(Source):
    """``s3://bucket/prefix``: every object under ``<prefix>/<label>/`` for each label, in key
    order (at most ``max_per_class`` of them); hidden keys and folder markers are left out.
    Its items' origin is ``origin`` (default:
    :func:`~dandelion_lib.data.sources.default_source_name`: the prefix's last part, or the
    bucket's name)."""

    def __init__(
        self,
        url: str,
        settings: Settings,
        origin: str | None = None,
        *,
        page_size: int = 1000,
    ):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise IngestError(f"an S3 source is s3://bucket[/prefix], got {url!r}")
        self.store = S3Store(
            parsed.netloc,
            unquote(parsed.path),
            endpoint_url=settings.storage.s3_endpoint_url,
            region=settings.storage.s3_region,
        )
        self.description = self.store.url
        self.origin = origin or default_source_name(url)
        self.labels = settings.labels
        self.limit = settings.ingest.max_per_class
        self.max_bytes = settings.images.max_download_bytes
        self.concurrency = max(1, settings.ingest.http_concurrency)
        self.page_size = page_size
        self._listed: dict[str, ListedObject] = {}

    def _uri(self, relative: str) -> str:
        return f"{self.description}/{relative}"

    def _walk(self, prefix: str) -> Iterator[ListedObject]:
        """The visible objects under ``prefix``; a bucket that cannot be listed is a one-line
        :class:`SourceUnavailableError`."""
        try:
            for obj in self.store.walk(prefix, page_size=self.page_size):
                if not _hidden(obj.key):
                    yield obj
        except StoreError as exc:
            raise SourceUnavailableError(f"source {self.description}: {exc}") from None

    def _item(self, label: str, obj: ListedObject) -> SourceItem:
        item = SourceItem(label, self._uri(obj.key), self.origin)
        self._listed[item.source] = obj
        return item

    def items(self) -> list[SourceItem]:
        out: list[SourceItem] = []
        missing = []
        for label in self.labels:
            listed: list[SourceItem] = []
            for obj in self._walk(f"{label}/"):
                if self.limit is not None and len(listed) >= self.limit:
                    break
                listed.append(self._item(label, obj))
            if not listed:
                missing.append(f"{label}/")
            out += listed
        if missing:
            raise SourceUnavailableError(
                f"source {self.description} has no objects under {', '.join(missing)} "
                "(expected <label>/<file> for each label)"
            )
        return out

    def fetch(self, item: SourceItem, known: dict[str, Any] | None) -> Fetched:
        obj = self._listed[item.source]
        validators: dict[str, Any] = {"size": obj.size, "etag": obj.etag}
        if known and all(known.get(k) == v for k, v in validators.items()):
            return Fetched(None, validators, not_modified=True)
        if obj.size > self.max_bytes:
            raise FetchError("too_large", f"more than {self.max_bytes:,} bytes")
        try:
            data = self.store.get_limited(obj.key, self.max_bytes)
        except ObjectTooLargeError:
            raise FetchError("too_large", f"more than {self.max_bytes:,} bytes") from None
        except ObjectNotFoundError:
            raise FetchError("not_found", "deleted from the bucket since it was listed") from None
        except StoreError as exc:
            raise FetchError("read_error", str(exc)) from None
        return Fetched(data, validators)


class S3NegativesSource(S3Source):
    """The ``negatives`` source in a bucket: every object under ``<prefix>/<kind>/`` for
    every kind, labelled ``unknown``. Objects directly under the prefix (a README, a list of
    origins) are not photos and are left out."""

    def __init__(self, url: str, settings: Settings, *, page_size: int = 1000):
        super().__init__(url, settings, NEGATIVES_ORIGIN, page_size=page_size)
        self.description = f"negatives {self.store.url}"

    def _uri(self, relative: str) -> str:
        return f"{self.store.url}/{relative}"

    def items(self) -> list[SourceItem]:
        out = [self._item(UNKNOWN, obj) for obj in self._walk("") if "/" in obj.key]
        if not out:
            raise SourceUnavailableError(
                f"negatives source {self.store.url} has no objects under a kind "
                "(expected <kind>/<file>, DANDELION_NEGATIVES_SOURCE)"
            )
        return out
