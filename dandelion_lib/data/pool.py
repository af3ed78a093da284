"""Fetch, check and store every item of a source in a bounded pool of threads.

Each item is accepted or refused by :func:`dandelion_lib.core.images.accept_image` (format
sniff, size limits, full decode); refused items (with a reason code) never reach the store.
Valid images are stored once under ``raw/<label>/<sha256>.<ext>`` as their canonical bytes
(:func:`dandelion_lib.core.images.canonical_image`: the original bytes of an ordinary file,
anything after the image's end cut), keyed by the sha256 of the stored bytes (the source index
keeps the original sha256 of a changed item).

``ingest/index.json`` in the store (:class:`SourceIndex`) remembers, per source item, its
sha256 and HTTP validators (ETag/Last-Modified) or file size/mtime, and per image its
metadata, so a re-run over an unchanged source downloads and decodes nothing already stored.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import image_stats, perceptual_hash
from dandelion_lib.core.images import (
    CanonicalImage,
    ImageLimits,
    InvalidImageError,
    accept_image,
    canonical_image,
)
from dandelion_lib.core.storage import (
    CorruptObjectError,
    ObjectNotFoundError,
    ObjectStore,
    sha256_hex,
)
from dandelion_lib.data.rejections import SourceUnavailableError
from dandelion_lib.data.sources import FetchError, Source, SourceItem

log = logging.getLogger(__name__)

INDEX_KEY = "ingest/index.json"
INDEX_SCHEMA = 1
RAW_PREFIX = "raw/"


def raw_key(label: str, sha256: str, ext: str) -> str:
    return f"{RAW_PREFIX}{label}/{sha256}.{ext}"


def unreachable(source: Source, detail: str) -> SourceUnavailableError:
    """The one-line error of a source that cannot be reached at all."""
    return SourceUnavailableError(
        f"cannot reach {source.description}: {detail}; "
        "set DANDELION_SOURCE to a local folder with one sub-folder per label"
    )


@dataclass
class Outcome:
    item: SourceItem
    status: str  # "new" | "unchanged" | "rejected"
    fetched: bool = False
    sha256: str | None = None
    image: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""
    entry: dict[str, Any] | None = None  # the source index entry to remember
    original_sha256: str | None = None  # of the bytes as fetched, when not stored as they were


class SourceIndex:
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

    def remember(self, outcome: Outcome) -> None:
        """Keep a successful outcome's source entry and image description."""
        if outcome.entry is not None:
            self.sources[outcome.item.source] = outcome.entry
        if outcome.sha256 and outcome.image:
            self.images[outcome.sha256] = outcome.image

    def save(self) -> None:
        with self._lock:
            doc = {"schema": INDEX_SCHEMA, "sources": self.sources, "images": self.images}
            data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self.store.put_bytes(INDEX_KEY, data, content_type="application/json")


class Worker:
    """Fetches, validates and stores one item; called from the pool's threads."""

    def __init__(self, source: Source, store: ObjectStore, settings: Settings, index: SourceIndex):
        self.source = source
        self.store = store
        self.limits = ImageLimits.from_settings(settings, with_bytes=True)
        self.index = index
        self.raw = set(store.list(RAW_PREFIX))
        self._raw_lock = threading.Lock()

    def _usable(self, entry: dict[str, Any] | None, label: str) -> dict[str, Any] | None:
        """The index entry when it can answer a not-modified reply without the bytes."""
        if not entry:
            return None
        if entry.get("rejected"):
            return entry
        image = self.index.images.get(entry.get("sha256", ""))
        if image and raw_key(label, entry["sha256"], image["ext"]) in self.raw:
            return entry
        return None

    def __call__(self, item: SourceItem) -> Outcome:
        known = self._usable(self.index.sources.get(item.source), item.label)
        try:
            fetched = self.source.fetch(item, known)
        except FetchError as exc:
            return Outcome(item, "rejected", reason=exc.reason, detail=exc.detail)
        if fetched.not_modified and known is not None:
            return self._not_modified(item, known, {**known, **fetched.validators})
        outcome = self._ingest_bytes(item, fetched.data or b"", fetched.content_type)
        outcome.fetched = True
        outcome.entry = dict(fetched.validators)
        if outcome.status == "rejected":
            outcome.entry.update(rejected=outcome.reason, detail=outcome.detail)
        else:
            outcome.entry["sha256"] = outcome.sha256
            if outcome.original_sha256:
                outcome.entry["original_sha256"] = outcome.original_sha256
        return outcome

    def _not_modified(
        self, item: SourceItem, known: dict[str, Any], entry: dict[str, Any]
    ) -> Outcome:
        """What the index says of an item the source did not send again."""
        if known.get("rejected"):
            detail = known.get("detail", "")
            return Outcome(item, "rejected", reason=known["rejected"], detail=detail, entry=entry)
        sha = known["sha256"]
        return Outcome(item, "unchanged", sha256=sha, image=self.index.images[sha], entry=entry)

    def _ingest_bytes(self, item: SourceItem, data: bytes, content_type: str | None) -> Outcome:
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
                return Outcome(item, "rejected", reason=exc.reason, detail=detail)
            if canonical.changed:
                data, sha = canonical.data, sha256_hex(canonical.data)
                _log_canonical(item, canonical)
        key = raw_key(item.label, sha, image["ext"])
        stored = self._store(key, data, sha, image, described)
        outcome = Outcome(item, "unchanged" if stored else "new", sha256=sha, image=image)
        if sha != original:
            outcome.original_sha256 = original
        return outcome

    def _store(
        self, key: str, data: bytes, sha: str, image: dict[str, Any], described: bool
    ) -> bool:
        """Store ``data`` under ``key`` unless it is there; whether it was there already."""
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
        return stored

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


def _log_canonical(item: SourceItem, canonical: CanonicalImage) -> None:
    log.info(
        "%s: stored the image only (%s)",
        item.source,
        "re-encoded as PNG"
        if canonical.reencoded
        else f"{canonical.trailing_bytes:,} bytes after its end cut",
    )


def _progress_bar(total: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="img", desc="ingest", disable=not enabled, leave=False)


IN_FLIGHT_PER_THREAD = 4
"""Items submitted ahead per worker thread: the pool never holds more than this many items'
work (and bytes) at once, however long the source's listing."""


def run_pool(worker: Worker, items: list[SourceItem], progress: bool | None) -> list[Outcome]:
    """Every item's outcome, in the order of ``items``. The first item is fetched alone: an
    unreachable source fails fast with one clear error. At most
    ``IN_FLIGHT_PER_THREAD`` items per thread are in flight at once (bounded memory at any
    number of items). New images are checkpointed into the index now and then, so a killed
    run does not redo everything."""
    if not items:
        return []
    bar = _progress_bar(len(items), progress)
    try:
        first = worker(items[0])
        if first.reason == "connection_error":
            raise unreachable(worker.source, first.detail)
        bar.update(1)
        threads = max(1, worker.source.concurrency)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            window = threads * IN_FLIGHT_PER_THREAD
            outcomes = [first, *_collect(pool, worker, items[1:], window, bar)]
    finally:
        bar.close()
    order = {item.source: i for i, item in enumerate(items)}
    return sorted(outcomes, key=lambda o: order[o.item.source])


def _collect(
    pool: ThreadPoolExecutor, worker: Worker, items: list[SourceItem], window: int, bar: Any
) -> list[Outcome]:
    """The outcomes of ``items``, with at most ``window`` of them submitted at a time."""
    outcomes: list[Outcome] = []
    checkpoint = _Checkpoint(worker.index)
    pending: set[Future[Outcome]] = set()
    try:
        for item in items:
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                outcomes += [checkpoint.note(fut.result(), bar) for fut in done]
            pending.add(pool.submit(worker, item))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            outcomes += [checkpoint.note(fut.result(), bar) for fut in done]
    except BaseException:
        # Fail fast (e.g. the store became unreachable): drop what has not started.
        for fut in pending:
            fut.cancel()
        raise
    return outcomes


CHECKPOINT_MIN_NEW = 50
"""New images before the source index is saved again (and at least ``CHECKPOINT_MIN_S``)."""
CHECKPOINT_GROWTH = 0.1
"""... or this share of the images the index already holds, when more: the index is one
document rewritten whole, so a fixed interval would write O(N^2) bytes over a run; growing
with it, the bytes written stay within ~11x the final index (a killed run redoes at most
about a tenth of its images' work)."""
CHECKPOINT_MIN_S = 5.0


class _Checkpoint:
    """Saves the source index now and then during a run, so a killed run does not redo
    everything (see :data:`CHECKPOINT_GROWTH`)."""

    def __init__(self, index: SourceIndex, min_interval_s: float = CHECKPOINT_MIN_S):
        self.index = index
        self.min_interval_s = min_interval_s
        self.last_save = time.monotonic()
        self.unsaved = 0

    def due(self) -> bool:
        """Whether enough new images (and time) have passed since the last save."""
        wanted = max(CHECKPOINT_MIN_NEW, int(len(self.index.images) * CHECKPOINT_GROWTH))
        return self.unsaved >= wanted and time.monotonic() - self.last_save > self.min_interval_s

    def note(self, o: Outcome, bar: Any) -> Outcome:
        bar.update(1)
        if o.status == "new":
            self.unsaved += 1
            self.index.images[o.sha256 or ""] = o.image or {}
            if o.entry is not None:
                self.index.sources[o.item.source] = o.entry
        if self.due():
            self.index.save()
            self.last_save, self.unsaved = time.monotonic(), 0
        return o
