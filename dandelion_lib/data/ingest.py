"""Ingestion: from an image source to a versioned, checksummed dataset in the object store.

Sources (chosen by :func:`make_source` from ``Settings.source``):

* :class:`HttpSource`: the reference URL layout ``<base>/<label>/<8-digit index>.jpg``,
  downloaded by a bounded pool with a per-request timeout, retries with exponential backoff
  on 5xx, 429 and timeouts (never on 404) and conditional requests on re-runs;
* :class:`FolderSource`: a local folder with one sub-folder per label.

``Settings.negatives_source`` (optional) adds a second source, ``negatives``: a local folder
of photos that are neither class, one sub-folder per kind (:class:`NegativesSource`). They
are stored and versioned like every other image, with the label ``unknown`` (the answer they
should get; never a class of the model) and their path as provenance; the open-set detector
is fitted on them (see :mod:`dandelion_lib.data.dataset` for their split).

``Settings.ingest_feedback`` (default on) adds accepted feedback with images
(:class:`FeedbackSource`): a reviewer's accepted ``neither`` becomes a negative.

Every item is accepted or refused by :func:`dandelion_lib.core.images.accept_image` (format
sniff, size limits, full decode); rejected items (with a reason code) never reach the store. Valid images are stored
once under ``raw/<label>/<sha256>.<ext>`` as their canonical bytes
(:func:`dandelion_lib.core.images.canonical_image`: the original bytes of an ordinary file,
anything after the image's end cut), keyed and listed in the manifest by the sha256 of the
stored bytes (so a photo and the same photo with a payload appended are one image; the
source index keeps the original sha256 of a changed item); exact duplicates collapse,
near-duplicates share a group, and :mod:`dandelion_lib.data.dataset` writes the manifest and
moves ``datasets/latest``.

``ingest/index.json`` in the store remembers, per source item, its sha256 and HTTP
validators (ETag/Last-Modified) or file size/mtime, and per image its metadata, so a re-run
over an unchanged source downloads and decodes nothing already stored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlparse

import httpx
import pandas as pd
from pydantic import ValidationError
from tqdm import tqdm

from dandelion_lib.core.config import NEITHER, UNKNOWN, Settings, get_settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import STAT_COLUMNS, image_stats, perceptual_hash
from dandelion_lib.core.images import (
    CanonicalImage,
    ImageLimits,
    InvalidImageError,
    RejectReason,
    accept_image,
    canonical_image,
)
from dandelion_lib.core.storage import (
    CorruptObjectError,
    ObjectNotFoundError,
    ObjectStore,
    open_store,
    sha256_hex,
)
from dandelion_lib.data import dataset
from dandelion_lib.data.feedback import (
    FEEDBACK_SOURCE_PREFIX,
    FeedbackRecord,
    FeedbackStore,
    FeedbackUnavailableError,
)

log = logging.getLogger(__name__)

INDEX_KEY = "ingest/index.json"
INDEX_SCHEMA = 1
RAW_PREFIX = "raw/"

REJECTION_REASONS: dict[str, str] = {
    "not_found": "the source answered 404/410 (not retried)",
    "http_error": "the source answered another HTTP error, or 5xx/429 after all retries",
    "timeout": "no complete response within the per-request timeout, after all retries",
    "connection_error": "the source could not be reached, after all retries",
    "read_error": "the local file could not be read",
    **{reason.value: reason.description for reason in RejectReason},
    "label_conflict": "the same bytes appear under more than one label",
}
"""Every reason code an item can be rejected with (documented in docs/data.md)."""


class IngestError(DandelionError):
    """Ingestion could not produce a dataset version."""


class SourceUnavailableError(IngestError):
    """The source cannot be reached or read at all."""


class DatasetQualityError(IngestError):
    """Too few images in a class, or classes too unbalanced."""


# --- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceItem:
    label: str
    source: str  # URL or path, recorded in the manifest's ``source`` column


@dataclass
class Fetched:
    """The result of fetching one item: its bytes, or ``not_modified`` since the last run."""

    data: bytes | None
    validators: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    not_modified: bool = False


class FetchError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Source(ABC):
    """Where images come from. Implementations must be safe to call from several threads."""

    description: str
    concurrency: int = 4

    @abstractmethod
    def items(self) -> list[SourceItem]:
        """Every item of the source, in a stable order."""

    @abstractmethod
    def fetch(self, item: SourceItem, known: dict[str, Any] | None) -> Fetched:
        """The item's bytes, or ``Fetched(None, not_modified=True)`` when ``known`` (the
        validators recorded last time) still holds. Raises :class:`FetchError`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderSource(Source):
    """A local folder with one sub-folder per label (files in any supported format)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        labels: tuple[str, ...],
        limit: int | None = None,
        max_bytes: int | None = None,
    ):
        self.root = Path(os.path.abspath(Path(root).expanduser()))  # noqa: PTH100 - no symlink resolving
        self.labels = labels
        self.limit = limit
        self.max_bytes = max_bytes
        self.description = str(self.root)
        self.concurrency = min(8, (os.cpu_count() or 1) * 2)

    def items(self) -> list[SourceItem]:
        if not self.root.is_dir():
            raise SourceUnavailableError(f"source folder {self.root} does not exist")
        missing = [lab for lab in self.labels if not (self.root / lab).is_dir()]
        if missing:
            raise SourceUnavailableError(
                f"source folder {self.root} has no sub-folder for label(s) {', '.join(missing)}"
            )
        out: list[SourceItem] = []
        for label in self.labels:
            files = sorted(
                p
                for p in (self.root / label).rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            )
            out += [SourceItem(label, str(p)) for p in files[: self.limit]]
        return out

    def fetch(self, item: SourceItem, known: dict[str, Any] | None) -> Fetched:
        path = Path(item.source)
        try:
            st = path.stat()
            validators = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            if known and all(known.get(k) == v for k, v in validators.items()):
                return Fetched(None, validators, not_modified=True)
            if self.max_bytes is not None and st.st_size > self.max_bytes:
                raise FetchError("too_large", f"more than {self.max_bytes:,} bytes")
            return Fetched(path.read_bytes(), validators)
        except OSError as exc:
            raise FetchError("read_error", f"cannot read {path}: {exc.strerror}") from None


class HttpSource(Source):
    """``<base_url>/<label>/<8-digit index>.jpg`` for each label and index."""

    RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

    def __init__(self, base_url: str, settings: Settings):
        self.base_url = base_url.rstrip("/")
        self.description = self.base_url
        self.settings = settings
        self.concurrency = max(1, settings.http_concurrency)
        count = settings.source_count
        if settings.max_per_class is not None:
            count = min(count, settings.max_per_class)
        self.indices = range(settings.source_start, settings.source_start + max(count, 0))
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.http_timeout_s),
            limits=httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
            follow_redirects=True,
            headers={"User-Agent": "dandelion-ingest"},
        )

    def items(self) -> list[SourceItem]:
        return [
            SourceItem(label, f"{self.base_url}/{label}/{i:08d}.jpg")
            for label in self.settings.labels
            for i in self.indices
        ]

    def close(self) -> None:
        self._client.close()

    def fetch(self, item: SourceItem, known: dict[str, Any] | None) -> Fetched:
        headers: dict[str, str] = {}
        if known and known.get("etag"):
            headers["If-None-Match"] = known["etag"]
        if known and known.get("last_modified"):
            headers["If-Modified-Since"] = known["last_modified"]
        retries = max(0, self.settings.http_retries)
        for attempt in range(retries + 1):
            try:
                return self._get(item.source, headers, conditional=bool(headers))
            except _Retryable as exc:
                if attempt == retries:
                    raise FetchError(exc.reason, exc.detail) from None
                delay = self.settings.http_backoff_s * (2**attempt)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, 30.0))
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, url: str, headers: dict[str, str], conditional: bool) -> Fetched:
        timeout = self.settings.http_timeout_s
        deadline = time.monotonic() + timeout
        try:
            with self._client.stream("GET", url, headers=headers) as resp:
                status = resp.status_code
                if status == 304 and conditional:
                    return Fetched(None, _validators(resp.headers), not_modified=True)
                if status in (404, 410):
                    raise FetchError("not_found", f"HTTP {status}")
                if status in self.RETRY_STATUS:
                    raise _Retryable("http_error", f"HTTP {status}", _retry_after(resp.headers))
                if status != 200:
                    raise FetchError("http_error", f"HTTP {status}")
                chunks: list[bytes] = []
                size = 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > self.settings.max_download_bytes:
                        raise FetchError(
                            "too_large",
                            f"more than {self.settings.max_download_bytes:,} bytes",
                        )
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("response took too long")
                    chunks.append(chunk)
                return Fetched(
                    b"".join(chunks), _validators(resp.headers), resp.headers.get("content-type")
                )
        except httpx.TimeoutException:
            raise _Retryable("timeout", f"no complete response within {timeout:g} s") from None
        except httpx.TransportError as exc:
            raise _Retryable("connection_error", _one_line(exc)) from None


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


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


class NegativesSource(FolderSource):
    """The ``negatives`` source: every file in the sub-folders (kinds) of a local folder,
    labelled ``unknown``. Files at the top level (a README, a list of origins) are not photos
    and are left out."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None):
        super().__init__(root, (UNKNOWN,), None, max_bytes)
        self.description = f"negatives {self.root}"

    def items(self) -> list[SourceItem]:
        if not self.root.is_dir():
            raise SourceUnavailableError(
                f"negatives folder {self.root} does not exist (DANDELION_NEGATIVES_SOURCE)"
            )
        kinds = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not kinds:
            raise SourceUnavailableError(
                f"negatives folder {self.root} has no sub-folders (one per kind of photo)"
            )
        return [
            SourceItem(UNKNOWN, str(p))
            for kind in kinds
            for p in sorted(kind.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(kind).parts)
        ]


class CombinedSource(Source):
    """Several sources (the labelled one, negatives, accepted feedback) ingested as one
    dataset version; each item is fetched by the source that listed it."""

    def __init__(self, *parts: Source):
        self.parts = parts
        self.description = " + ".join(p.description for p in parts)
        self.concurrency = parts[0].concurrency
        self._owner: dict[str, Source] = {}

    def items(self) -> list[SourceItem]:
        out: list[SourceItem] = []
        for part in self.parts:
            listed = part.items()
            self._owner.update({item.source: part for item in listed})
            out += listed
        return out

    def fetch(self, item: SourceItem, known: dict[str, Any] | None) -> Fetched:
        return self._owner[item.source].fetch(item, known)

    def close(self) -> None:
        for part in self.parts:
            part.close()


class FeedbackSource(Source):
    """Accepted feedback (``dandelion feedback review --accept``) with its image: the photo
    under the label the user gave, ``neither`` becoming a negative (label ``unknown``).
    Rejected and unreviewed feedback never enters. The item's source is
    ``feedback:<feedback id>`` (the feedback database has the rest of its provenance)."""

    def __init__(self, records: list[FeedbackRecord], store: ObjectStore, labels: tuple[str, ...]):
        self.records = records
        self.image_keys = {r.feedback_id: r.image_key for r in records}
        self.store = store
        self.labels = labels
        self.description = f"accepted feedback ({len(records)})"

    def items(self) -> list[SourceItem]:
        out = []
        for r in self.records:
            label = UNKNOWN if r.correct_label == NEITHER else r.correct_label
            if label in self.labels or label == UNKNOWN:
                out.append(SourceItem(label, f"{FEEDBACK_SOURCE_PREFIX}{r.feedback_id}"))
        return out

    def fetch(self, item: SourceItem, known: dict[str, Any] | None) -> Fetched:
        feedback_id = item.source[len(FEEDBACK_SOURCE_PREFIX) :]
        key = self.image_keys[feedback_id]
        try:
            return Fetched(self.store.get_bytes(key or ""))
        except ObjectNotFoundError:
            raise FetchError("read_error", f"feedback image {key} is missing") from None


def accepted_feedback(settings: Settings) -> list[FeedbackRecord]:
    """Accepted feedback with images, or none when there is no feedback database yet."""
    url = settings.resolved_feedback_db_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        return []
    feedback = FeedbackStore(url)
    try:
        return feedback.accepted()
    except FeedbackUnavailableError as exc:
        raise SourceUnavailableError(
            f"{exc}; set DANDELION_INGEST_FEEDBACK=false to ingest without accepted feedback"
        ) from None
    finally:
        feedback.close()


def add_accepted_feedback(
    settings: Settings | None = None,
    *,
    store: ObjectStore | None = None,
    progress: bool | None = None,
) -> IngestReport | None:
    """Retraining's ingestion: a new dataset version that is the latest one plus the accepted
    feedback photos it lacks (its images keep their splits). ``None`` when none is waiting."""
    settings = settings or get_settings()
    store = store or open_store(settings=settings)
    reviewed = accepted_feedback(settings)
    if not reviewed:
        return None
    feedback = FeedbackStore(settings.resolved_feedback_db_url, store=store, labels=settings.labels)
    try:
        waiting = feedback.awaiting_dataset().count
    except FeedbackUnavailableError as exc:
        raise SourceUnavailableError(str(exc)) from None
    finally:
        feedback.close()
    if not waiting:
        return None
    only_feedback = settings.model_copy(update={"ingest_feedback": False, "negatives_source": None})
    return ingest(
        only_feedback,
        source=FeedbackSource(reviewed, store, settings.labels),
        store=store,
        extend=True,
        progress=progress,
    )


def make_source(spec: str | None = None, settings: Settings | None = None) -> Source:
    """An HTTP source for ``http(s)://`` URLs, otherwise a local folder (path or file:// URL)."""
    settings = settings or get_settings()
    spec = spec or settings.source
    parsed = urlparse(spec)
    if parsed.scheme in ("http", "https"):
        return HttpSource(spec, settings)
    path = unquote(parsed.path) if parsed.scheme == "file" else spec
    return FolderSource(path, settings.labels, settings.max_per_class, settings.max_download_bytes)


def make_negatives_source(spec: str, settings: Settings) -> NegativesSource:
    """The ``negatives`` source of a local folder (path or file:// URL)."""
    parsed = urlparse(spec)
    if parsed.scheme not in ("", "file"):
        raise IngestError(f"DANDELION_NEGATIVES_SOURCE must be a local folder, got {spec!r}")
    path = unquote(parsed.path) if parsed.scheme == "file" else spec
    return NegativesSource(path, settings.max_download_bytes)


# --- the run ------------------------------------------------------------------------------


@dataclass
class Rejection:
    source: str
    label: str
    reason: str
    detail: str


@dataclass
class IngestReport:
    """What a run did. ``fetched``: items whose bytes were read or downloaded; ``new``: images
    stored by this run; ``unchanged``: images already in the store; ``duplicates``: items
    collapsed onto an identical image; ``rejected``: items left out, with reasons."""

    source: str
    store: str
    total: int = 0
    fetched: int = 0
    new: int = 0
    unchanged: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    version: str | None = None
    created: bool = False
    images: int = 0
    classes: dict[str, dict[str, int]] = field(default_factory=dict)
    near_duplicate_groups: int = 0
    seconds: float = 0.0
    feedback: list[dict[str, Any]] = field(default_factory=list)
    """Provenance of every accepted-feedback photo in the version (see :func:`_provenance`)."""

    def reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(r.reason for r in self.rejected).items()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = self.reasons()
        return d

    def summary(self, max_rejections: int = 20) -> str:
        state = "new" if self.created else "existing"
        lines = [
            f"dataset version {self.version} ({state}) in {self.store}: {self.images} images",
            f"  source {self.source}: items {self.total}, fetched {self.fetched}, new {self.new}, "
            f"unchanged {self.unchanged}, duplicates {self.duplicates}, "
            f"rejected {len(self.rejected)}",
        ]
        for label, counts in self.classes.items():
            parts = " / ".join(f"{s} {counts.get(s, 0)}" for s in dataset.SPLITS)
            lines.append(f"  {label}: {counts.get('total', 0)} ({parts})")
        if self.near_duplicate_groups:
            lines.append(f"  near-duplicate groups: {self.near_duplicate_groups}")
        if self.rejected:
            reasons = ", ".join(f"{k} {v}" for k, v in self.reasons().items())
            lines.append(f"  rejected by reason: {reasons}")
            for r in self.rejected[:max_rejections]:
                lines.append(f"    {r.reason:<16} {r.source}  ({r.detail})")
            if len(self.rejected) > max_rejections:
                lines.append(f"    ... and {len(self.rejected) - max_rejections} more")
        lines.append(f"  took {self.seconds:.1f} s")
        return "\n".join(lines)


@dataclass
class _Outcome:
    item: SourceItem
    status: str  # "new" | "unchanged" | "rejected"
    fetched: bool = False
    sha256: str | None = None
    image: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""
    entry: dict[str, Any] | None = None  # the source index entry to remember
    original_sha256: str | None = None  # of the bytes as fetched, when not stored as they were


class _Index:
    """``ingest/index.json``: per source item its sha256/validators, per image its metadata."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self.sources: dict[str, dict[str, Any]] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        try:
            data = store.get_json(INDEX_KEY)
            if isinstance(data, dict) and data.get("schema") == INDEX_SCHEMA:
                self.sources = dict(data.get("sources", {}))
                self.images = dict(data.get("images", {}))
        except ObjectNotFoundError:
            pass
        except (CorruptObjectError, ValueError) as exc:
            log.warning(
                "ignoring unreadable %s (%s); everything will be re-fetched", INDEX_KEY, exc
            )

    def save(self) -> None:
        with self._lock:
            doc = {"schema": INDEX_SCHEMA, "sources": self.sources, "images": self.images}
            data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self.store.put_bytes(INDEX_KEY, data, content_type="application/json")


def _raw_key(label: str, sha256: str, ext: str) -> str:
    return f"{RAW_PREFIX}{label}/{sha256}.{ext}"


class _Worker:
    """Fetches, validates and stores one item; called from the pool's threads."""

    def __init__(
        self, source: Source, store: ObjectStore, settings: Settings, index: _Index, raw: set[str]
    ):
        self.source = source
        self.store = store
        self.settings = settings
        self.limits = ImageLimits.from_settings(settings, with_bytes=True)
        self.index = index
        self.raw = raw
        self._raw_lock = threading.Lock()

    def _usable(self, entry: dict[str, Any] | None, label: str) -> dict[str, Any] | None:
        """The index entry when it can answer a not-modified reply without the bytes."""
        if not entry:
            return None
        if entry.get("rejected"):
            return entry
        image = self.index.images.get(entry.get("sha256", ""))
        if image and _raw_key(label, entry["sha256"], image["ext"]) in self.raw:
            return entry
        return None

    def __call__(self, item: SourceItem) -> _Outcome:
        known = self._usable(self.index.sources.get(item.source), item.label)
        try:
            fetched = self.source.fetch(item, known)
        except FetchError as exc:
            return _Outcome(item, "rejected", reason=exc.reason, detail=exc.detail)
        if fetched.not_modified and known is not None:
            entry = {**known, **fetched.validators}
            if known.get("rejected"):
                return _Outcome(
                    item,
                    "rejected",
                    reason=known["rejected"],
                    detail=known.get("detail", ""),
                    entry=entry,
                )
            sha = known["sha256"]
            return _Outcome(
                item, "unchanged", sha256=sha, image=self.index.images[sha], entry=entry
            )
        data = fetched.data or b""
        outcome = self._ingest_bytes(item, data, fetched.content_type)
        outcome.fetched = True
        outcome.entry = dict(fetched.validators)
        if outcome.status == "rejected":
            outcome.entry.update(rejected=outcome.reason, detail=outcome.detail)
        else:
            outcome.entry["sha256"] = outcome.sha256
            if outcome.original_sha256:
                outcome.entry["original_sha256"] = outcome.original_sha256
        return outcome

    def _ingest_bytes(self, item: SourceItem, data: bytes, content_type: str | None) -> _Outcome:
        sha = original = sha256_hex(data)
        # Known images are keyed by the sha256 of their stored (canonical) bytes; bytes that
        # hash to one of them are those bytes, so nothing needs decoding again.
        image = self.index.images.get(sha)
        described = image is None
        if image is None:
            try:
                canonical, image = self._describe(data)
            except InvalidImageError as exc:
                detail = str(exc)
                if content_type and not content_type.startswith("image/"):
                    detail += f"; served as {content_type.split(';')[0]}"
                return _Outcome(item, "rejected", reason=exc.reason, detail=detail)
            if canonical.changed:
                data, sha = canonical.data, sha256_hex(canonical.data)
                log.info(
                    "%s: stored the image only (%s)",
                    item.source,
                    "re-encoded as PNG"
                    if canonical.reencoded
                    else f"{canonical.trailing_bytes:,} bytes after its end cut",
                )
        key = _raw_key(item.label, sha, image["ext"])
        with self._raw_lock:
            stored = key in self.raw
        complete = stored
        if stored and described:
            # Stored by an interrupted run: make sure its checksum was recorded too.
            info = self.store.info(key)
            complete = info is not None and info.sha256 == sha
        if not complete:
            self.store.put_bytes(key, data, content_type=f"image/{image['format'].lower()}")
            with self._raw_lock:
                self.raw.add(key)
        outcome = _Outcome(item, "unchanged" if stored else "new", sha256=sha, image=image)
        if sha != original:
            outcome.original_sha256 = original
        return outcome

    def _describe(self, data: bytes) -> tuple[CanonicalImage, dict[str, Any]]:
        """Validate an image: what is stored of it and its description; raises
        InvalidImageError."""
        accepted = accept_image(data, self.limits)
        canonical = canonical_image(data, accepted)
        img = accepted.image
        phash, stats = perceptual_hash(img), image_stats(img)
        return canonical, {
            "format": canonical.format,
            "ext": canonical.ext,
            "width": img.width,
            "height": img.height,
            "bytes": len(canonical.data),
            "phash": phash,
            "ingested_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "stats": stats,
        }


def _progress_bar(total: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="img", desc="ingest", disable=not enabled, leave=False)


def ingest(
    settings: Settings | None = None,
    *,
    source: Source | str | None = None,
    store: ObjectStore | None = None,
    extend: bool = False,
    progress: bool | None = None,
    negatives: str | None = None,
) -> IngestReport:
    """Ingest ``source`` (default: ``settings.source``) into ``store`` as a dataset version.

    ``negatives`` (default: ``settings.negatives_source``; unset: none) is a folder of
    out-of-domain photos ingested alongside as the ``negatives`` source.

    With ``extend``, the images of the current latest version are kept alongside the
    source's. Raises :class:`SourceUnavailableError` when the source cannot be read at all and
    :class:`DatasetQualityError` when a class is too small or the classes too unbalanced (no
    version is written then). The progress bar shows on a terminal unless ``progress`` says.
    """
    settings = settings or get_settings()
    start = time.monotonic()
    store = store or open_store(settings=settings)
    src = source if isinstance(source, Source) else make_source(source, settings)
    parts = [src]
    negatives = negatives or settings.negatives_source
    if negatives:
        parts.append(make_negatives_source(negatives, settings))
    if settings.ingest_feedback:
        reviewed = accepted_feedback(settings)
        if reviewed:
            parts.append(FeedbackSource(reviewed, store, settings.labels))
    if len(parts) > 1:
        src = CombinedSource(*parts)
    store.check()
    with src:
        items = src.items()
        report = IngestReport(source=src.description, store=store.url, total=len(items))
        index = _Index(store)
        raw = set(store.list(RAW_PREFIX))
        worker = _Worker(src, store, settings, index, raw)
        outcomes = _run_pool(worker, items, src, index, progress)

    # Successful outcomes are remembered even when the quality checks below fail.
    for o in outcomes:
        if o.entry is not None:
            index.sources[o.item.source] = o.entry
        if o.sha256 and o.image:
            index.images[o.sha256] = o.image
    index.save()

    ok = [o for o in outcomes if o.status != "rejected"]
    failed = [o for o in outcomes if o.status == "rejected"]
    if items and not ok and failed and all(o.reason == "connection_error" for o in failed):
        raise SourceUnavailableError(
            f"cannot reach {src.description}: {failed[0].detail}; "
            "set DANDELION_SOURCE to a local folder with one sub-folder per label"
        )
    report.fetched = sum(o.fetched for o in outcomes)
    report.rejected = [Rejection(o.item.source, o.item.label, o.reason, o.detail) for o in failed]

    records, report.duplicates = _collapse(ok, report)
    stored = {(r["label"], r["sha256"]) for r in records}
    report.new = len({(o.item.label, o.sha256) for o in ok if o.status == "new"} & stored)
    report.unchanged = len(stored) - report.new
    previous = _latest_manifest(store)
    if extend and previous is not None:
        records = _against_previous(records, previous, report)
        records += _previous_records(previous, {r["sha256"] for r in records})

    # Stable splits: an image of the latest version keeps its split; only new images are split.
    manifest = dataset.build_manifest(
        records,
        seed=settings.split_seed,
        near_duplicate_distance=settings.near_duplicate_distance,
        previous=previous,
    )
    _summarise(manifest, report, settings.labels)
    report.feedback = _provenance(manifest, parts, store, previous)
    _check_quality(report, settings)
    report.seconds = time.monotonic() - start
    report.version, report.created = dataset.write_version(
        store, manifest, _stored_report(report, settings)
    )
    report.seconds = time.monotonic() - start
    return report


def _run_pool(
    worker: _Worker, items: list[SourceItem], src: Source, index: _Index, progress: bool | None
) -> list[_Outcome]:
    if not items:
        return []
    outcomes: list[_Outcome] = []
    bar = _progress_bar(len(items), progress)
    try:
        # The first item alone: an unreachable source fails fast with one clear error.
        first = worker(items[0])
        if first.reason == "connection_error":
            raise SourceUnavailableError(
                f"cannot reach {src.description}: {first.detail}; "
                "set DANDELION_SOURCE to a local folder with one sub-folder per label"
            )
        outcomes.append(first)
        bar.update(1)
        last_save = time.monotonic()
        unsaved = 0
        with ThreadPoolExecutor(max_workers=src.concurrency) as pool:
            futures = [pool.submit(worker, item) for item in items[1:]]
            try:
                for fut in as_completed(futures):
                    o = fut.result()
                    outcomes.append(o)
                    bar.update(1)
                    if o.status == "new":
                        unsaved += 1
                        index.images[o.sha256 or ""] = o.image or {}
                        if o.entry is not None:
                            index.sources[o.item.source] = o.entry
                    # Checkpoint now and then, so a killed run does not redo everything.
                    if unsaved >= 50 and time.monotonic() - last_save > 5.0:
                        index.save()
                        last_save, unsaved = time.monotonic(), 0
            except BaseException:
                # Fail fast (e.g. the store became unreachable): drop what has not started.
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        bar.close()
    order = {item.source: i for i, item in enumerate(items)}
    return sorted(outcomes, key=lambda o: order[o.item.source])


def _collapse(ok: list[_Outcome], report: IngestReport) -> tuple[list[dict[str, Any]], int]:
    """Manifest records from valid outcomes: one per (label, sha256); the same bytes under
    two labels are rejected as ``label_conflict``."""
    by_sha: dict[str, list[_Outcome]] = {}
    for o in ok:
        by_sha.setdefault(o.sha256 or "", []).append(o)
    records: list[dict[str, Any]] = []
    duplicates = 0
    for sha, group in by_sha.items():
        labels = sorted({o.item.label for o in group})
        curated = {o.item.label for o in group if not _is_feedback(o.item.source)}
        if len(labels) > 1 and len(curated) == 1:
            # Feedback never relabels a curated photo: its label stands, the feedback is left out.
            (label,) = curated
            report.rejected += [
                Rejection(
                    o.item.source,
                    o.item.label,
                    "label_conflict",
                    f"the same photo is labelled {label} by its source; that label stands",
                )
                for o in group
                if o.item.label != label
            ]
            group = [o for o in group if o.item.label == label]
            labels = [label]
        if len(labels) > 1:
            report.rejected += [
                Rejection(
                    o.item.source,
                    o.item.label,
                    "label_conflict",
                    f"identical bytes are labelled {' and '.join(labels)}",
                )
                for o in group
            ]
            continue
        first = min(group, key=lambda o: o.item.source)
        duplicates += len(group) - 1
        image = first.image or {}
        records.append(
            {
                "sha256": sha,
                "label": first.item.label,
                "key": _raw_key(first.item.label, sha, image["ext"]),
                "source": first.item.source,
                "width": image["width"],
                "height": image["height"],
                "format": image["format"],
                "bytes": image["bytes"],
                "ingested_at": image["ingested_at"],
                "phash": image["phash"],
                **{c: image["stats"][c] for c in STAT_COLUMNS},
            }
        )
    return records, duplicates


def _latest_manifest(store: ObjectStore) -> pd.DataFrame | None:
    """The latest version's manifest, or ``None`` before the first version."""
    try:
        return dataset.load_manifest(store)
    except dataset.DatasetNotFoundError:
        return None


def _previous_records(previous: pd.DataFrame, exclude: set[str]) -> list[dict[str, Any]]:
    previous = previous[~previous["sha256"].isin(exclude)]
    # pandas types record keys as Hashable; the manifest's column labels are all str
    return cast(
        "list[dict[str, Any]]", previous.drop(columns=["group", "split"]).to_dict("records")
    )


def _is_feedback(source: str) -> bool:
    return source.startswith(FEEDBACK_SOURCE_PREFIX)


def _against_previous(
    records: list[dict[str, Any]], previous: pd.DataFrame, report: IngestReport
) -> list[dict[str, Any]]:
    """Extending a version: a photo it already has keeps its label, split and source.

    The same photo under another label is a ``label_conflict`` (listed in the report, left
    out: the earlier version's label stands, nothing is silently relabelled); under the same
    label it is a duplicate of the earlier image."""
    known = dict(
        zip(
            previous["sha256"], zip(previous["label"], previous["source"], strict=True), strict=True
        )
    )
    kept = []
    for r in records:
        if r["sha256"] not in known:
            kept.append(r)
            continue
        label, source = known[r["sha256"]]
        if label != r["label"]:
            report.rejected.append(
                Rejection(
                    r["source"],
                    r["label"],
                    "label_conflict",
                    f"the dataset already labels this photo {label} ({source}); that label stands",
                )
            )
        else:
            report.duplicates += 1
    return kept


def _provenance(
    manifest: pd.DataFrame, parts: list[Source], store: ObjectStore, previous: pd.DataFrame | None
) -> list[dict[str, Any]]:
    """One entry per accepted-feedback photo of ``manifest``: its feedback id, the model
    version that answered, what it answered, when the user sent it and when the reviewer
    accepted it (from this run's feedback source; photos that came in an earlier version
    keep the entry of that version's report)."""
    records = {
        r.feedback_id: r for p in _parts(parts) if isinstance(p, FeedbackSource) for r in p.records
    }
    earlier: dict[str, dict[str, Any]] = {}
    if previous is not None:
        entries = dataset.load_report(store).get("feedback") or []
        earlier = {str(e.get("feedback_id")): e for e in entries if isinstance(e, dict)}
    out = []
    rows = manifest[manifest["source"].str.startswith(FEEDBACK_SOURCE_PREFIX)]
    for row in rows.itertuples():
        feedback_id = str(row.source)[len(FEEDBACK_SOURCE_PREFIX) :]
        entry = {
            "feedback_id": feedback_id,
            "sha256": row.sha256,
            "label": row.label,
            "split": row.split,
        }
        r = records.get(feedback_id)
        if r is not None:
            entry |= {
                "model_name": r.model_name,
                "model_version": r.model_version,
                "predicted_label": r.predicted_label,
                "correct_label": r.correct_label,
                "sent_at": r.created_at.isoformat(),
                "reviewed_at": r.reviewed_at.isoformat() if r.reviewed_at else None,
            }
        else:
            entry = earlier.get(feedback_id, {}) | entry
        out.append(entry)
    return out


def _parts(parts: list[Source]) -> list[Source]:
    """The sources of ``parts``, combined ones opened up."""
    out: list[Source] = []
    for p in parts:
        out += _parts(list(p.parts)) if isinstance(p, CombinedSource) else [p]
    return out


def _summarise(manifest: pd.DataFrame, report: IngestReport, labels: tuple[str, ...]) -> None:
    report.images = len(manifest)
    for label in sorted(set(labels) | set(manifest["label"])):
        rows = manifest[manifest["label"] == label]
        counts = {"total": len(rows)}
        counts.update({s: int((rows["split"] == s).sum()) for s in dataset.SPLITS})
        report.classes[label] = counts
    sizes = manifest["group"].value_counts()
    report.near_duplicate_groups = int((sizes > 1).sum())


def _check_quality(report: IngestReport, settings: Settings) -> None:
    counts = {label: report.classes.get(label, {}).get("total", 0) for label in settings.labels}
    rejected = f"; {len(report.rejected)} items rejected" if report.rejected else ""
    for label, n in counts.items():
        if n < settings.min_images_per_class:
            raise DatasetQualityError(
                f"class {label!r} has {n} valid images, below the minimum of "
                f"{settings.min_images_per_class} (DANDELION_MIN_IMAGES_PER_CLASS){rejected}"
            )
    hi, lo = max(counts.values()), min(counts.values())
    if lo and hi / lo > settings.max_class_imbalance:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise DatasetQualityError(
            f"class balance {hi / lo:.2f}:1 ({shown}) is worse than the limit "
            f"{settings.max_class_imbalance:g}:1 (DANDELION_MAX_CLASS_IMBALANCE)"
        )


def _stored_report(report: IngestReport, settings: Settings) -> dict[str, Any]:
    d = report.to_dict()
    for k in ("version", "created", "seconds", "fetched", "new", "unchanged"):
        d.pop(k, None)
    d["created_at"] = datetime.now(UTC).isoformat()
    d["settings"] = {
        k: getattr(settings, k)
        for k in (
            "labels",
            "negatives_source",
            "split_seed",
            "near_duplicate_distance",
            "min_image_side",
            "max_image_pixels",
            "min_images_per_class",
            "max_class_imbalance",
        )
    }
    return d


# --- CLI ----------------------------------------------------------------------------------


def load_settings() -> Settings:
    """The environment's settings; an invalid value is a one-line :class:`IngestError`."""
    try:
        return get_settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "?"
        raise IngestError(
            f"invalid setting {name} (DANDELION_{name.upper()}): {err['msg']}"
        ) from None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="HTTP base URL or local folder (DANDELION_SOURCE)")
    parser.add_argument("--store", help="object store URL (DANDELION_STORE_URL)")
    parser.add_argument("--start", type=int, help="first index of the HTTP layout")
    parser.add_argument("--count", type=int, help="images per label of the HTTP layout")
    parser.add_argument("--max-per-class", type=int, help="take at most N images per label")
    parser.add_argument(
        "--extend", action="store_true", help="keep the images of the latest version too"
    )
    parser.add_argument(
        "--negatives", help="folder of photos that are neither class (DANDELION_NEGATIVES_SOURCE)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal)",
    )


def cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    updates = {
        k: v
        for k, v in {
            "source": args.source,
            "store_url": args.store,
            "source_start": args.start,
            "source_count": args.count,
            "max_per_class": args.max_per_class,
            "negatives_source": args.negatives,
        }.items()
        if v is not None
    }
    settings = load_settings().model_copy(update=updates)
    report = ingest(settings, extend=args.extend, progress=args.progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.summary())
    return 0
