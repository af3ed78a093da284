"""Where ingested images come from: the :class:`Source` interface and the local sources.

* :class:`FolderSource`: a local folder with one sub-folder per label;
* :class:`NegativesSource`: a local folder of photos that are neither class, one sub-folder
  per kind, labelled ``unknown``;
* :class:`FeedbackSource`: accepted feedback with its image (:func:`accepted_feedback`);
* :class:`CombinedSource`: several of them ingested as one dataset version.

The HTTP layout is :class:`dandelion_lib.data.httpsource.HttpSource`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dandelion_lib.core.config import Settings
from dandelion_lib.core.labels import NEITHER, UNKNOWN
from dandelion_lib.core.storage import ObjectNotFoundError, ObjectStore
from dandelion_lib.data.feedback import (
    FEEDBACK_SOURCE_PREFIX,
    FeedbackRecord,
    FeedbackStore,
    FeedbackUnavailableError,
)
from dandelion_lib.data.rejections import SourceUnavailableError


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


def _visible_files(folder: Path, below: Path) -> list[Path]:
    """Every file under ``folder`` with no hidden part in its path below ``below``, sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(below).parts)
    )


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
            files = _visible_files(self.root / label, self.root)
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
        return [SourceItem(UNKNOWN, str(p)) for kind in kinds for p in _visible_files(kind, kind)]


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
