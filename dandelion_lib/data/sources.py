"""Where ingested images come from: the :class:`Source` interface and the local sources.

* :class:`FolderSource`: a local folder with one sub-folder per label;
* :class:`NegativesSource`: a local folder of photos that are neither class, one sub-folder
  per kind, labelled ``unknown``;
* :class:`FeedbackSource`: accepted feedback with its image (:func:`accepted_feedback`);
* :class:`CombinedSource`: several of them ingested as one dataset version.

The HTTP layout is :class:`dandelion_lib.data.httpsource.HttpSource`, a bucket
(``s3://bucket/prefix``) :class:`dandelion_lib.data.s3source.S3Source` and
:class:`~dandelion_lib.data.s3source.S3NegativesSource`.

Every source has an ``origin``, the name recorded in the manifest's ``origin`` column for each
of its images: a labelled source's name (:func:`parse_source_specs`: ``name=spec`` or a name
derived from the spec), :data:`NEGATIVES_ORIGIN` for the negatives, :data:`FEEDBACK_ORIGIN`
for accepted feedback.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from dandelion_lib.core.config import DEFAULT_SOURCE, Settings
from dandelion_lib.core.labels import NEITHER, UNKNOWN
from dandelion_lib.core.storage import ObjectNotFoundError, ObjectStore
from dandelion_lib.data.feedback import (
    FEEDBACK_SOURCE_PREFIX,
    FeedbackRecord,
    FeedbackStore,
    FeedbackUnavailableError,
)
from dandelion_lib.data.rejections import IngestError, SourceUnavailableError

NEGATIVES_ORIGIN = "negatives"
"""The origin of the negatives (``DANDELION_NEGATIVES_SOURCE``)."""
FEEDBACK_ORIGIN = "feedback"
"""The origin of accepted feedback photos."""
DEFAULT_SOURCE_NAME = "greenr"
"""The name of :data:`~dandelion_lib.core.config.DEFAULT_SOURCE`, the greenr reference set."""
RESERVED_NAMES = frozenset({NEGATIVES_ORIGIN, FEEDBACK_ORIGIN, "default"})
"""Names a labelled source cannot take: the other origins, and ``default`` (the origin of the
images of a manifest written before origins were recorded)."""

_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)=(?P<spec>.+)$")


@dataclass(frozen=True)
class SourceItem:
    label: str
    source: str  # URL or path, recorded in the manifest's ``source`` column
    origin: str = ""  # the source's name, recorded in the manifest's ``origin`` column


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
    origin: str = ""
    """The name its items record as their origin."""

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
        origin: str | None = None,
    ):
        self.root = Path(os.path.abspath(Path(root).expanduser()))  # noqa: PTH100 - no symlink resolving
        self.origin = origin or self.root.name
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
            out += [SourceItem(label, str(p), self.origin) for p in files[: self.limit]]
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
        super().__init__(root, (UNKNOWN,), None, max_bytes, NEGATIVES_ORIGIN)
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
            SourceItem(UNKNOWN, str(p), self.origin)
            for kind in kinds
            for p in _visible_files(kind, kind)
        ]


class CombinedSource(Source):
    """Several sources (the labelled ones, negatives, accepted feedback) ingested as one
    dataset version; each item is fetched by the source that listed it. Items are listed
    part by part, in the order of ``parts``."""

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
        self.origin = FEEDBACK_ORIGIN

    def items(self) -> list[SourceItem]:
        out = []
        for r in self.records:
            label = UNKNOWN if r.correct_label == NEITHER else r.correct_label
            if label in self.labels or label == UNKNOWN:
                out.append(
                    SourceItem(label, f"{FEEDBACK_SOURCE_PREFIX}{r.feedback_id}", self.origin)
                )
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


# --- naming the labelled sources ----------------------------------------------------------


def is_http(spec: str) -> bool:
    return urlparse(spec).scheme in ("http", "https")


def is_s3(spec: str) -> bool:
    return urlparse(spec).scheme == "s3"


def folder_path(spec: str) -> str:
    """The local path of a folder spec (a path or a ``file://`` URL)."""
    parsed = urlparse(spec)
    return unquote(parsed.path) if parsed.scheme == "file" else spec


def default_source_name(spec: str) -> str:
    """The name of an unnamed source: ``greenr`` for the default HTTP source, the last
    non-empty path segment of another URL (its host when it has none; a bucket source
    ``s3://bucket/prefix``: the prefix's last part, or the bucket), a folder's basename."""
    if is_http(spec) or is_s3(spec):
        if spec.rstrip("/") == DEFAULT_SOURCE.rstrip("/"):
            return DEFAULT_SOURCE_NAME
        parsed = urlparse(spec)
        segments = [s for s in unquote(parsed.path).split("/") if s]
        host = parsed.netloc if is_s3(spec) else parsed.hostname
        return segments[-1] if segments else host or ""
    return Path(os.path.abspath(Path(folder_path(spec)).expanduser())).name  # noqa: PTH100


def parse_source_specs(value: str) -> list[tuple[str, str]]:
    """``(name, spec)`` of each labelled source of a comma-separated list, in its order.

    Each entry is a spec (an HTTP base URL, a bucket ``s3://bucket/prefix``, a local folder
    or a ``file://`` URL), optionally
    named ``name=spec`` (a name is letters, digits, ``.``, ``_`` and ``-``); an unnamed one
    gets :func:`default_source_name`. Raises :class:`IngestError` when the list is empty, two
    sources share a name or a spec, or a name is one of :data:`RESERVED_NAMES`.
    """
    out: list[tuple[str, str]] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        named = _NAMED.match(entry)
        name, spec = (named["name"], named["spec"].strip()) if named else ("", entry)
        out.append((name or default_source_name(spec), spec))
    if not out:
        raise IngestError(
            "DANDELION_SOURCE is empty: give an HTTP base URL, an s3:// bucket or a local folder"
        )
    _check_names(out)
    return out


def _check_names(named: list[tuple[str, str]]) -> None:
    seen: dict[str, str] = {}
    for name, spec in named:
        if not name:
            raise IngestError(f"source {spec!r} has no name: write it as name={spec}")
        if name in RESERVED_NAMES:
            raise IngestError(
                f"source {spec!r} is named {name!r}, a reserved name "
                f"({', '.join(sorted(RESERVED_NAMES))}): write it as another-name={spec}"
            )
        if name in seen:
            raise IngestError(
                f"two sources are named {name!r} ({seen[name]} and {spec}): "
                f"name them apart in DANDELION_SOURCE, e.g. {name}-2={spec}"
            )
        seen[name] = spec


def absolute_source_specs(value: str) -> str:
    """``value`` (a list of sources) with every local folder as an absolute path, each keeping
    its name (written ``name=path`` where the path's basename would name it otherwise)."""
    out = []
    for name, spec in parse_source_specs(value):
        if "://" in spec:
            out.append(spec if default_source_name(spec) == name else f"{name}={spec}")
            continue
        path = str(Path(spec).expanduser().resolve())
        out.append(path if Path(path).name == name else f"{name}={path}")
    return ",".join(out)
