"""Which images a dataset version gets, and where each one comes from.

Exact duplicates collapse into one manifest record per ``(label, sha256)``: the item of the
first source in the run's order (the labelled sources in the order they are listed, then the
negatives, then feedback) is recorded, with its origin; within one source, the first path or
URL in sorted order. The same bytes under two labels are a ``label_conflict``, except
that feedback never relabels a photo a curated source labels (:func:`collapse`) and that a
version extending an earlier one keeps that version's label (:func:`extend_previous`). Every
accepted-feedback photo of a version keeps its provenance in the version's report
(:func:`feedback_provenance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pandas as pd

from dandelion_lib.core.features import STAT_COLUMNS
from dandelion_lib.core.storage import ObjectStore
from dandelion_lib.data import dataset
from dandelion_lib.data.feedback import FEEDBACK_SOURCE_PREFIX, FeedbackRecord
from dandelion_lib.data.pool import Outcome, raw_key
from dandelion_lib.data.rejections import Rejection
from dandelion_lib.data.sources import CombinedSource, FeedbackSource, Source


@dataclass
class Records:
    """Manifest records, and what choosing them left out."""

    records: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)


def _is_feedback(source: str) -> bool:
    return source.startswith(FEEDBACK_SOURCE_PREFIX)


def collapse(ok: list[Outcome]) -> Records:
    """Manifest records from valid outcomes (in the order of the run's items): one per
    (label, sha256); the same bytes under two labels are rejected as ``label_conflict``.

    Among exact duplicates, the record keeps the item of the source listed first (its
    ``origin`` and ``source``), then the smallest ``source``: deterministic, whatever order
    the pool fetched them in."""
    by_sha: dict[str, list[Outcome]] = {}
    rank: dict[str, int] = {}
    for o in ok:
        by_sha.setdefault(o.sha256 or "", []).append(o)
        rank.setdefault(o.item.origin, len(rank))
    out = Records()
    for sha, outcomes in by_sha.items():
        group = _curated_label(outcomes, out.rejected)
        labels = sorted({o.item.label for o in group})
        if len(labels) > 1:
            detail = f"identical bytes are labelled {' and '.join(labels)}"
            out.rejected += [_conflict(o, detail) for o in group]
            continue
        first = min(group, key=lambda o: (rank[o.item.origin], o.item.source))
        out.duplicates += len(group) - 1
        out.records.append(_record(sha, first))
    return out


def _curated_label(group: list[Outcome], rejected: list[Rejection]) -> list[Outcome]:
    """Feedback never relabels a curated photo: its label stands, the feedback is left out
    (added to ``rejected``)."""
    labels = {o.item.label for o in group}
    curated = {o.item.label for o in group if not _is_feedback(o.item.source)}
    if len(labels) < 2 or len(curated) != 1:
        return group
    (label,) = curated
    detail = f"the same photo is labelled {label} by its source; that label stands"
    rejected += [_conflict(o, detail) for o in group if o.item.label != label]
    return [o for o in group if o.item.label == label]


def _conflict(outcome: Outcome, detail: str) -> Rejection:
    return Rejection(outcome.item.source, outcome.item.label, "label_conflict", detail)


def _record(sha: str, first: Outcome) -> dict[str, Any]:
    image = first.image or {}
    return {
        "sha256": sha,
        "label": first.item.label,
        "key": raw_key(first.item.label, sha, image["ext"]),
        "source": first.item.source,
        "origin": first.item.origin or dataset.LEGACY_ORIGIN,
        "width": image["width"],
        "height": image["height"],
        "format": image["format"],
        "bytes": image["bytes"],
        "ingested_at": image["ingested_at"],
        "phash": image["phash"],
        **{c: image["stats"][c] for c in STAT_COLUMNS},
    }


def extend_previous(records: list[dict[str, Any]], previous: pd.DataFrame) -> Records:
    """Extending a version: a photo it already has keeps its label, split and source, and
    every image of it is kept.

    The same photo under another label is a ``label_conflict`` (listed in the report, left
    out: the earlier version's label stands, nothing is silently relabelled); under the same
    label it is a duplicate of the earlier image."""
    known = dict(
        zip(
            previous["sha256"], zip(previous["label"], previous["source"], strict=True), strict=True
        )
    )
    out = Records()
    for r in records:
        if r["sha256"] not in known:
            out.records.append(r)
            continue
        label, source = known[r["sha256"]]
        if label != r["label"]:
            detail = f"the dataset already labels this photo {label} ({source}); that label stands"
            out.rejected.append(Rejection(r["source"], r["label"], "label_conflict", detail))
        else:
            out.duplicates += 1
    kept = previous[~previous["sha256"].isin({r["sha256"] for r in out.records})]
    # pandas types record keys as Hashable; the manifest's column labels are all str
    out.records += cast(
        "list[dict[str, Any]]", kept.drop(columns=["group", "split"]).to_dict("records")
    )
    return out


def feedback_provenance(
    manifest: pd.DataFrame, source: Source, store: ObjectStore, previous: pd.DataFrame | None
) -> list[dict[str, Any]]:
    """One entry per accepted-feedback photo of ``manifest``: its feedback id, the model
    version that answered, what it answered, when the user sent it and when the reviewer
    accepted it (from this run's feedback source; photos that came in an earlier version
    keep the entry of that version's report)."""
    records = _feedback_records(source)
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
        out.append((entry | _sent(r)) if r is not None else (earlier.get(feedback_id, {}) | entry))
    return out


def _sent(r: FeedbackRecord) -> dict[str, Any]:
    """What a feedback record tells of its photo: who answered what, sent and reviewed when."""
    return {
        "model_name": r.model_name,
        "model_version": r.model_version,
        "predicted_label": r.predicted_label,
        "correct_label": r.correct_label,
        "sent_at": r.created_at.isoformat(),
        "reviewed_at": r.reviewed_at.isoformat() if r.reviewed_at else None,
    }


def _feedback_records(source: Source) -> dict[str, FeedbackRecord]:
    """The feedback records of ``source``'s feedback sources, combined sources opened up."""
    if isinstance(source, FeedbackSource):
        return {r.feedback_id: r for r in source.records}
    if isinstance(source, CombinedSource):
        return {k: v for part in source.parts for k, v in _feedback_records(part).items()}
    return {}
