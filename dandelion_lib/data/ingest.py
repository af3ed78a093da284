"""Ingestion: from image sources to a versioned, checksummed dataset in the object store.

A run reads its sources (:mod:`dandelion_lib.data.sources`), chosen from the settings:

* ``Settings.source`` (:func:`make_sources`): one or more labelled sources, comma-separated,
  each optionally named ``name=spec``: the reference HTTP URL layout
  (:class:`~dandelion_lib.data.httpsource.HttpSource`), a local folder with one sub-folder
  per label (:class:`~dandelion_lib.data.sources.FolderSource`) or a bucket with one key
  prefix per label (:class:`~dandelion_lib.data.s3source.S3Source`). Each image records its
  source's name in the manifest's ``origin`` column
  (:func:`~dandelion_lib.data.sources.parse_source_specs` names unnamed ones);
* ``Settings.negatives_source`` (optional): a local folder or a bucket of photos that are
  neither class, one sub-folder (key prefix) per kind
  (:class:`~dandelion_lib.data.sources.NegativesSource`,
  :class:`~dandelion_lib.data.s3source.S3NegativesSource`), stored and
  versioned like every other image with the label ``unknown`` (the answer they should get;
  never a class of the model) and their path as provenance; the open-set detector is fitted
  on them (see :mod:`dandelion_lib.data.dataset` for their split);
* ``Settings.ingest_feedback`` (default on): accepted feedback with images
  (:class:`~dandelion_lib.data.sources.FeedbackSource`): a reviewer's accepted ``neither``
  becomes a negative.

Every item is fetched, checked and stored by a bounded pool (:mod:`dandelion_lib.data.pool`;
rejected items never reach the store, and a re-run fetches nothing already stored); exact
duplicates collapse and label conflicts are settled (:mod:`dandelion_lib.data.provenance`);
the quality gate (:mod:`dandelion_lib.data.quality`) passes or no version is written; then
:mod:`dandelion_lib.data.dataset` writes the manifest (near-duplicate groups, stable splits)
and moves ``datasets/latest``. :class:`IngestReport` says what the run did.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import ObjectStore, open_store
from dandelion_lib.data import dataset
from dandelion_lib.data.feedback import FeedbackStore, FeedbackUnavailableError
from dandelion_lib.data.httpsource import HttpSource
from dandelion_lib.data.pool import Outcome, SourceIndex, Worker, run_pool, unreachable
from dandelion_lib.data.provenance import collapse, extend_previous, feedback_provenance
from dandelion_lib.data.quality import check_quality
from dandelion_lib.data.rejections import IngestError, Rejection, SourceUnavailableError
from dandelion_lib.data.review import ReviewQueue
from dandelion_lib.data.s3source import S3NegativesSource, S3Source
from dandelion_lib.data.sources import (
    CombinedSource,
    FeedbackSource,
    FolderSource,
    NegativesSource,
    Source,
    accepted_feedback,
    folder_path,
    is_http,
    is_s3,
    parse_source_specs,
)


@dataclass
class IngestReport:
    """What a run did. ``fetched``: items whose bytes were read or downloaded; ``new``: images
    stored by this run; ``unchanged``: images already in the store; ``duplicates``: items
    collapsed onto an identical image; ``rejected``: items left out, with reasons;
    ``classes``: label -> ``total`` and per-split counts; ``origins``: the same per origin
    (origin -> label -> counts)."""

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
    origins: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    near_duplicate_groups: int = 0
    seconds: float = 0.0
    feedback: list[dict[str, Any]] = field(default_factory=list)
    """Provenance of every accepted-feedback photo in the version (see
    :func:`~dandelion_lib.data.provenance.feedback_provenance`)."""

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
        lines += [f"  {label}: {_split_counts(counts)}" for label, counts in self.classes.items()]
        if len(self.origins) > 1:
            lines.append("  per source:")
            for origin, labels in self.origins.items():
                text = ", ".join(f"{lab} {_split_counts(c)}" for lab, c in labels.items())
                lines.append(f"    {origin}: {text}")
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


def _split_counts(counts: dict[str, int]) -> str:
    parts = " / ".join(f"{s} {counts.get(s, 0)}" for s in dataset.SPLITS)
    return f"{counts.get('total', 0)} ({parts})"


# --- sources ------------------------------------------------------------------------------


def make_sources(value: str | None, settings: Settings) -> list[Source]:
    """The labelled sources of ``value`` (default: ``settings.ingest.source``), in its order:
    a comma-separated list of specs, each optionally named ``name=spec``
    (:func:`~dandelion_lib.data.sources.parse_source_specs`). An ``http(s)://`` URL is an HTTP
    source, an ``s3://bucket/prefix`` a bucket source, anything else a local folder (path or
    file:// URL). Raises :class:`IngestError`
    when two share a name or a location, or a name is reserved."""
    named = parse_source_specs(value or settings.ingest.source)
    sources = [_labelled_source(name, spec, settings) for name, spec in named]
    seen: dict[str, str] = {}
    for src in sources:
        if src.description in seen:
            raise IngestError(
                f"sources {seen[src.description]!r} and {src.origin!r} are the same "
                f"({src.description}); list it once in DANDELION_SOURCE"
            )
        seen[src.description] = src.origin
    return sources


def _labelled_source(name: str, spec: str, settings: Settings) -> Source:
    if is_http(spec):
        return HttpSource(spec, settings, origin=name)
    if is_s3(spec):
        return S3Source(spec, settings, origin=name)
    return FolderSource(
        folder_path(spec),
        settings.labels,
        settings.ingest.max_per_class,
        settings.images.max_download_bytes,
        origin=name,
    )


def make_source(spec: str | None, settings: Settings) -> Source:
    """One labelled source: an HTTP source for ``http(s)://`` URLs, otherwise a local folder
    (path or file:// URL), optionally named ``name=spec``; ``spec`` defaults to
    ``settings.ingest.source``. A list of several (:func:`make_sources`) is combined into one
    :class:`CombinedSource`."""
    sources = make_sources(spec, settings)
    return sources[0] if len(sources) == 1 else CombinedSource(*sources)


def make_negatives_source(spec: str, settings: Settings) -> Source:
    """The ``negatives`` source of a local folder (path or file:// URL) or a bucket
    (``s3://bucket/prefix``)."""
    parsed = urlparse(spec)
    if parsed.scheme == "s3":
        return S3NegativesSource(spec, settings)
    if parsed.scheme not in ("", "file"):
        raise IngestError(
            f"DANDELION_NEGATIVES_SOURCE must be a local folder or an s3:// bucket, got {spec!r}"
        )
    return NegativesSource(folder_path(spec), settings.images.max_download_bytes)


def _sources(
    settings: Settings, source: Source | str | None, store: ObjectStore, negatives: str | None
) -> Source:
    """The run's source: ``source`` (one or more labelled sources), the negatives and
    accepted feedback, combined in this order."""
    parts = [source] if isinstance(source, Source) else make_sources(source, settings)
    negatives = negatives or settings.ingest.negatives_source
    if negatives:
        parts.append(make_negatives_source(negatives, settings))
    if settings.ingest.ingest_feedback:
        reviewed = accepted_feedback(settings)
        if reviewed:
            parts.append(FeedbackSource(reviewed, store, settings.labels))
    return CombinedSource(*parts) if len(parts) > 1 else parts[0]


# --- the run ------------------------------------------------------------------------------


def ingest(
    settings: Settings,
    *,
    source: Source | str | None = None,
    store: ObjectStore | None = None,
    extend: bool = False,
    progress: bool | None = None,
    negatives: str | None = None,
) -> IngestReport:
    """Ingest ``source`` (default: ``settings.ingest.source``; a :class:`Source`, or a spec or
    comma-separated list of specs as :func:`make_sources` reads them) into ``store`` as a
    dataset version.

    ``negatives`` (default: ``settings.ingest.negatives_source``; unset: none) is a folder of
    out-of-domain photos ingested alongside as the ``negatives`` source.

    With ``extend``, the images of the current latest version are kept alongside the
    source's. Raises :class:`SourceUnavailableError` when the source cannot be read at all and
    :class:`~dandelion_lib.data.quality.DatasetQualityError` when a class is too small or the
    classes too unbalanced (no version is written then). The progress bar shows on a terminal
    unless ``progress`` says.
    """
    start = time.monotonic()
    store = store or open_store(settings=settings)
    src = _sources(settings, source, store, negatives)
    store.check()
    with src:
        items = src.items()
        report = IngestReport(source=src.description, store=store.url, total=len(items))
        index = SourceIndex(store)
        outcomes = run_pool(Worker(src, store, settings, index), items, progress)
    # Successful outcomes are remembered even when the quality checks below fail.
    for o in outcomes:
        index.remember(o)
    index.save()

    records = _records(outcomes, src, report)
    previous = _latest_manifest(store)
    if extend and previous is not None:
        extended = extend_previous(records, previous)
        records = extended.records
        report.duplicates += extended.duplicates
        report.rejected += extended.rejected

    # Stable splits: an image of the latest version keeps its split; only new images are split.
    manifest = dataset.build_manifest(
        records,
        seed=settings.ingest.split_seed,
        near_duplicate_distance=settings.ingest.near_duplicate_distance,
        previous=previous,
    )
    _summarise(manifest, report, settings.labels)
    report.feedback = feedback_provenance(manifest, src, store, previous)
    check_quality(report.classes, len(report.rejected), settings)
    report.version, report.created = dataset.write_version(
        store, manifest, _stored_report(report, settings)
    )
    report.seconds = time.monotonic() - start
    return report


def _records(outcomes: list[Outcome], src: Source, report: IngestReport) -> list[dict[str, Any]]:
    """The manifest records of this run's valid items (exact duplicates collapsed); what was
    fetched, new, unchanged, collapsed or rejected goes into ``report``."""
    ok = [o for o in outcomes if o.status != "rejected"]
    failed = [o for o in outcomes if o.status == "rejected"]
    if failed and not ok and all(o.reason == "connection_error" for o in failed):
        raise unreachable(src, failed[0].detail)
    report.fetched = sum(o.fetched for o in outcomes)
    report.rejected = [Rejection(o.item.source, o.item.label, o.reason, o.detail) for o in failed]
    collapsed = collapse(ok)
    report.rejected += collapsed.rejected
    report.duplicates = collapsed.duplicates
    report.new, report.unchanged = _new_and_unchanged(ok, collapsed.records)
    return collapsed.records


def _new_and_unchanged(ok: list[Outcome], records: list[dict[str, Any]]) -> tuple[int, int]:
    """How many of the records' images this run stored, and how many were there already."""
    stored = {(r["label"], r["sha256"]) for r in records}
    new = len({(o.item.label, o.sha256) for o in ok if o.status == "new"} & stored)
    return new, len(stored) - new


def _latest_manifest(store: ObjectStore) -> pd.DataFrame | None:
    """The latest version's manifest, or ``None`` before the first version."""
    try:
        return dataset.load_manifest(store)
    except dataset.DatasetNotFoundError:
        return None


def _summarise(manifest: pd.DataFrame, report: IngestReport, labels: tuple[str, ...]) -> None:
    report.images = len(manifest)
    report.classes = _class_counts(manifest, sorted(set(labels) | set(manifest["label"])))
    report.origins = {
        str(origin): _class_counts(rows, sorted(set(rows["label"])))
        for origin, rows in manifest.groupby("origin", sort=True)
    }
    sizes = manifest["group"].value_counts()
    report.near_duplicate_groups = int((sizes > 1).sum())


def _class_counts(rows: pd.DataFrame, labels: list[str]) -> dict[str, dict[str, int]]:
    """Label -> ``total`` and per-split counts of ``rows``."""
    out = {}
    for label in labels:
        of_label = rows[rows["label"] == label]
        counts = {"total": len(of_label)}
        counts.update({s: int((of_label["split"] == s).sum()) for s in dataset.SPLITS})
        out[label] = counts
    return out


def _stored_report(report: IngestReport, settings: Settings) -> dict[str, Any]:
    d = report.to_dict()
    for k in ("version", "created", "seconds", "fetched", "new", "unchanged"):
        d.pop(k, None)
    d["created_at"] = datetime.now(UTC).isoformat()
    d["settings"] = {
        k: settings.flat()[k]
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


def add_accepted_feedback(
    settings: Settings, *, store: ObjectStore | None = None, progress: bool | None = None
) -> IngestReport | None:
    """Retraining's ingestion: a new dataset version that is the latest one plus the accepted
    feedback photos it lacks (its images keep their splits). ``None`` when none is waiting."""
    store = store or open_store(settings=settings)
    reviewed = accepted_feedback(settings)
    if not reviewed:
        return None
    feedback = FeedbackStore(settings.resolved_feedback_db_url, store=store, labels=settings.labels)
    try:
        waiting = ReviewQueue(feedback).awaiting_dataset().count
    except FeedbackUnavailableError as exc:
        raise SourceUnavailableError(str(exc)) from None
    finally:
        feedback.close()
    if not waiting:
        return None
    only_feedback = settings.updated(**{"ingest_feedback": False, "negatives_source": None})
    return ingest(
        only_feedback,
        source=FeedbackSource(reviewed, store, settings.labels),
        store=store,
        extend=True,
        progress=progress,
    )
