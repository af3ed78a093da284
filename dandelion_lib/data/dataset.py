"""Dataset versions: the manifest schema, near-duplicate groups, the split and the store layout.

A dataset version is one Parquet manifest, ``datasets/<version>/manifest.parquet``, with one
row per image (see :data:`MANIFEST_COLUMNS`). ``<version>`` is derived from the manifest's
content (which images, their labels, origins, groups and splits), so the same input always
yields the same version and any change yields a new one. Versions are immutable: an existing manifest is
never rewritten. ``datasets/latest`` (JSON ``{"version": ...}``) is written last, atomically,
so readers only ever see complete versions.

Rows labelled :data:`~dandelion_lib.core.config.UNKNOWN` are the ``negatives`` source: photos that
are neither class, which the open-set detector is fitted on (never a class of the model).
Their split is :func:`dandelion_lib.data.splits.split_ood`'s, stratified by kind (the photo's
folder): ``fit`` photos are their ``train`` split, ``eval`` photos their ``test`` split.

Each row's ``origin`` names the source it came from (``greenr``, a folder's name, ``negatives``,
``feedback``...; see :mod:`dandelion_lib.data.sources`). A manifest written before origins were
recorded (schema 1) reads with the origin :data:`LEGACY_ORIGIN` for every row.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import STAT_COLUMNS, FeatureSpec, bytes_to_model_input
from dandelion_lib.core.labels import UNKNOWN
from dandelion_lib.core.storage import ObjectNotFoundError, ObjectStore
from dandelion_lib.data.neardup import near_duplicate_groups as near_duplicate_groups
from dandelion_lib.data.splits import split_ood

MANIFEST_SCHEMA_VERSION = "2"
"""2: the ``origin`` column (1: none; such manifests read with :data:`LEGACY_ORIGIN`)."""

LEGACY_ORIGIN = "default"
"""The origin of every image of a manifest written before origins were recorded: which
source it came from is not known (the greenr reference set, most likely)."""

BASE_COLUMNS: tuple[str, ...] = (
    "sha256",
    "label",
    "key",
    "source",
    "origin",
    "width",
    "height",
    "format",
    "bytes",
    "ingested_at",
    "phash",
    "group",
    "split",
)
MANIFEST_COLUMNS: tuple[str, ...] = BASE_COLUMNS + STAT_COLUMNS
"""Every manifest has exactly these columns, in this order."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.70, "val": 0.15, "test": 0.15}

DATASETS_PREFIX = "datasets/"
LATEST_KEY = "datasets/latest"
BENCHMARK_KEY = "datasets/benchmark"
"""Points at the store's first version: its test split is the frozen benchmark (splits are
stable, so every later version's test split contains it)."""
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")

_STRING_COLUMNS = (
    "sha256",
    "label",
    "key",
    "source",
    "origin",
    "format",
    "phash",
    "group",
    "split",
)
_INT_COLUMNS = ("width", "height", "bytes")


class DatasetError(DandelionError):
    """A dataset version is missing or unusable."""


class DatasetNotFoundError(DatasetError):
    """No dataset version (or not the one asked for) in the store."""


def manifest_key(version: str) -> str:
    return f"{DATASETS_PREFIX}{version}/manifest.parquet"


def report_key(version: str) -> str:
    return f"{DATASETS_PREFIX}{version}/report.json"


# --- split --------------------------------------------------------------------------------


def _rank_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def assign_splits(
    labels: list[str], groups: list[str], seed: int, origins: list[str] | None = None
) -> list[str]:
    """Deterministic stratified 70/15/15 split that keeps each near-duplicate group whole.

    Each group belongs to the stratum of its most common ``(origin, label)`` pair (ties: the
    smallest pair), so every source's part of every class is split 70/15/15 on its own and
    each source's test part is about 15% of that source; without ``origins`` (or with one
    origin) the strata are the labels. Within a stratum, groups are ordered by a seeded hash
    of their id and laid end to end; a group goes to the split its midpoint falls in. The
    result depends only on the content and the seed, and adding an image moves at most the
    groups next to a split boundary.
    """
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(zip(origins or [""] * len(labels), labels, strict=True))
    strata: dict[tuple[str, str], list[str]] = {}
    for g, idx in members.items():
        counts: dict[tuple[str, str], int] = {}
        for i in idx:
            counts[keys[i]] = counts.get(keys[i], 0) + 1
        stratum = min(counts, key=lambda key: (-counts[key], key))
        strata.setdefault(stratum, []).append(g)
    out = [""] * len(labels)
    bounds = np.cumsum([SPLIT_FRACTIONS[s] for s in SPLITS])
    for stratum_groups in strata.values():
        ordered = sorted(stratum_groups, key=lambda g: _rank_key(seed, g))
        total = sum(len(members[g]) for g in ordered)
        position = 0
        for g in ordered:
            size = len(members[g])
            mid = (position + size / 2) / total
            split = SPLITS[min(int(np.searchsorted(bounds, mid, side="right")), len(SPLITS) - 1)]
            for i in members[g]:
                out[i] = split
            position += size
    return out


def negative_kind(source: str) -> str:
    """The kind of a negative photo: the name of the folder it came from (``daisy``...), or
    ``feedback`` for a reviewed ``neither`` answer."""
    if source.startswith("feedback:"):
        return "feedback"
    parent = PurePosixPath(source.replace("\\", "/")).parent.name
    return parent or "other"


def is_negative(frame: pd.DataFrame) -> pd.Series:
    """Rows of the ``negatives`` source (label ``unknown``)."""
    return frame["label"] == UNKNOWN


def assign_negative_splits(sha256s: list[str], kinds: list[str], seed: int) -> list[str]:
    """``train`` (may be fitted on) or ``test`` (evaluation only) for each negative photo."""
    parts = split_ood(sha256s, kinds, seed=seed)
    return ["train" if part == "fit" else "test" for part in parts]


# --- manifest -----------------------------------------------------------------------------


def build_manifest(
    records: Iterable[dict[str, Any]],
    *,
    seed: int,
    near_duplicate_distance: int,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """A manifest from per-image records (every column except ``group`` and ``split``; a
    record without ``origin`` gets :data:`LEGACY_ORIGIN`).

    Rows are sorted by ``(label, sha256)``; groups and splits are computed here, stratified
    by origin and label (:func:`assign_splits`). With the ``previous`` version's manifest,
    splits are stable (:func:`stable_splits`): an image of it keeps its split, and only the
    new images are split.
    """
    df = pd.DataFrame(list(records))
    if df.empty:
        df = pd.DataFrame({c: [] for c in MANIFEST_COLUMNS})
    df = _with_origin(df)
    df = df.sort_values(["label", "sha256"], kind="stable").reset_index(drop=True)
    df["group"] = near_duplicate_groups(
        df["sha256"].tolist(), df["phash"].tolist(), near_duplicate_distance
    )
    kept: dict[str, str] = {}
    if previous is not None and len(previous):
        kept = dict(zip(previous["sha256"], previous["split"], strict=True))
    negative = is_negative(df).to_numpy()
    split = np.empty(len(df), dtype=object)
    split[~negative] = stable_splits(
        df.loc[~negative, "sha256"].tolist(),
        df.loc[~negative, "group"].tolist(),
        kept,
        SPLITS,
        lambda rows: assign_splits(
            df.loc[~negative, "label"].iloc[rows].tolist(),
            df.loc[~negative, "group"].iloc[rows].tolist(),
            seed,
            df.loc[~negative, "origin"].iloc[rows].astype(str).tolist(),
        ),
    )
    neg_shas = df.loc[negative, "sha256"].tolist()
    neg_kinds = [negative_kind(s) for s in df.loc[negative, "source"]]
    split[negative] = stable_splits(
        neg_shas,
        df.loc[negative, "group"].tolist(),
        kept,
        ("train", "test"),
        lambda rows: _negative_group_splits(
            [neg_shas[i] for i in rows],
            [neg_kinds[i] for i in rows],
            [df.loc[negative, "group"].iloc[i] for i in rows],
            seed,
        ),
    )
    df["split"] = split.tolist()
    return normalize_manifest(df)


def _negative_group_splits(
    shas: list[str], kinds: list[str], groups: list[str], seed: int
) -> list[str]:
    """Negatives' splits; near-duplicate negatives share the split of the group's first photo
    (by sha256)."""
    first: dict[str, str] = {}
    splits = assign_negative_splits(shas, kinds, seed)
    return [first.setdefault(g, s) for g, s in zip(groups, splits, strict=True)]


_PROTECTIVE = ("test", "val", "train")
"""When a new image joins a group whose images were in different splits, the first of these."""


def stable_splits(
    sha256s: list[str],
    groups: list[str],
    kept: dict[str, str],
    allowed: tuple[str, ...],
    fresh: Callable[[list[int]], list[str]],
) -> list[str]:
    """Splits that never move an image of an earlier version (``kept``: sha256 -> split).

    An image already split (to one of ``allowed``) keeps its split. A new image that is a
    near-duplicate of kept ones joins their split (the most protective, test before val
    before train, if they differ), so no near-duplicate of a test image enters training. The
    remaining new images are split among themselves by ``fresh`` (called with their row
    indices, returning their splits). So a new version only adds; its test split grows by
    new images alone, and figures on the images tested before stay comparable.
    """
    out = [""] * len(sha256s)
    by_group: dict[str, set[str]] = {}
    for i, (sha, group) in enumerate(zip(sha256s, groups, strict=True)):
        previous = kept.get(sha)
        if previous in allowed:
            out[i] = previous
            by_group.setdefault(group, set()).add(previous)
    new = []
    for i, group in enumerate(groups):
        if out[i]:
            continue
        old = by_group.get(group)
        if old:
            out[i] = next(s for s in _PROTECTIVE if s in old)
        else:
            new.append(i)
    if new:
        for i, split in zip(new, fresh(new), strict=True):
            out[i] = split
    return out


def _with_origin(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with an ``origin`` column: :data:`LEGACY_ORIGIN` where it has none (a manifest
    of schema 1) or a row lacks one."""
    if "origin" not in df.columns:
        return df.assign(origin=LEGACY_ORIGIN)
    origin = df["origin"].where(df["origin"].notna() & (df["origin"] != ""), LEGACY_ORIGIN)
    return df.assign(origin=origin)


def normalize_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Columns in schema order with schema dtypes; raises :class:`DatasetError` if any is
    missing. A manifest without ``origin`` (schema 1) gets :data:`LEGACY_ORIGIN`."""
    df = _with_origin(df)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"manifest lacks columns {missing}")
    out = df.loc[:, list(MANIFEST_COLUMNS)].copy()
    for c in _STRING_COLUMNS:
        out[c] = out[c].astype(str)
    for c in _INT_COLUMNS:
        out[c] = out[c].astype("int64")
    for c in STAT_COLUMNS:
        out[c] = out[c].astype("float64")
    out["ingested_at"] = pd.to_datetime(out["ingested_at"], utc=True, format="ISO8601")
    return out.reset_index(drop=True)


def compute_version(df: pd.DataFrame) -> str:
    """Content-derived version id: 16 hex digits over the images, labels, origins, groups and
    splits.

    The origin (the source's name) counts: it decides the strata of the split and the
    per-source evaluation. Provenance (``source``, ``ingested_at``) and derived statistics
    are left out, so the same images from same-named sources, from a folder or over HTTP,
    today or tomorrow, get the same version.
    """
    h = hashlib.sha256(f"dandelion-manifest-v{MANIFEST_SCHEMA_VERSION}\n".encode())
    columns = ("sha256", "label", "key", "origin", "group", "split")
    df = _with_origin(df)
    rows = sorted(zip(*(df[c].astype(str) for c in columns), strict=True))
    for row in rows:
        h.update(("\t".join(row) + "\n").encode())
    return h.hexdigest()[:16]


def manifest_to_parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, engine="pyarrow")
    return buf.getvalue()


def write_version(
    store: ObjectStore, df: pd.DataFrame, report: dict[str, Any] | None = None
) -> tuple[str, bool]:
    """Write ``df`` as a dataset version unless it exists, then point ``datasets/latest`` at it.

    Order: report, manifest (its presence marks a complete version), then the pointer.
    Returns ``(version, created)``.
    """
    df = normalize_manifest(df)
    version = compute_version(df)
    created = not store.exists(manifest_key(version))
    if created:
        if report is not None:
            store.put_json(report_key(version), {**report, "version": version})
        store.put_bytes(
            manifest_key(version),
            manifest_to_parquet(df),
            content_type="application/vnd.apache.parquet",
        )
    store.put_json(LATEST_KEY, {"version": version})
    if not store.exists(BENCHMARK_KEY):
        store.put_json(BENCHMARK_KEY, {"version": version})
    return version, created


# --- reading ------------------------------------------------------------------------------


def latest_version(store: ObjectStore) -> str:
    """The version ``datasets/latest`` points at."""
    try:
        pointer = store.get_json(LATEST_KEY)
    except ObjectNotFoundError:
        raise DatasetNotFoundError(
            f"no dataset in {store.url}; run 'dandelion ingest' first"
        ) from None
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise DatasetError(f"{LATEST_KEY} in {store.url} is not a valid pointer: {pointer!r}")
    return version


def benchmark_version(store: ObjectStore, pinned: str | None = None) -> str | None:
    """The version whose test split is the frozen benchmark: ``pinned`` when given, else the
    store's first version (``datasets/benchmark``); ``None`` before any version."""
    if pinned:
        return pinned
    try:
        pointer = store.get_json(BENCHMARK_KEY)
    except ObjectNotFoundError:
        return None
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise DatasetError(f"{BENCHMARK_KEY} in {store.url} is not a valid pointer: {pointer!r}")
    return version


def list_versions(store: ObjectStore) -> list[str]:
    """Every complete version in the store (those with a manifest), sorted."""
    return sorted(
        key.split("/")[1]
        for key in store.list(DATASETS_PREFIX)
        if key.endswith("/manifest.parquet") and key.count("/") == 2
    )


def load_manifest(store: ObjectStore, version: str | None = None) -> pd.DataFrame:
    """The manifest of ``version`` (default: the latest), checked against its sha256."""
    version = version or latest_version(store)
    if not _VERSION_RE.match(version):
        raise DatasetNotFoundError(f"{version!r} is not a dataset version (16 hex digits)")
    try:
        data = store.get_bytes(manifest_key(version))
    except ObjectNotFoundError:
        raise DatasetNotFoundError(f"no dataset version {version} in {store.url}") from None
    df = pd.read_parquet(io.BytesIO(data), engine="pyarrow")
    df = normalize_manifest(df)
    df.attrs["version"] = version
    return df


def load_report(store: ObjectStore, version: str | None = None) -> dict[str, Any]:
    """The ingestion report stored with a version (empty when none was written)."""
    version = version or latest_version(store)
    try:
        report: dict[str, Any] = store.get_json(report_key(version))
    except ObjectNotFoundError:
        return {}
    return report


def load_examples(
    store: Any, rows: pd.DataFrame, spec: FeatureSpec | None = None, workers: int = 4
) -> npt.NDArray[np.uint8]:
    """Model inputs of the manifest ``rows`` as ``uint8`` ``(N, size, size, 3)``.

    Each image goes through :func:`~dandelion_lib.core.features.bytes_to_model_input` (exactly
    what the Predictor serves); its values are integers in [0, 255], so ``uint8`` is lossless.
    """
    spec = spec or FeatureSpec()

    def one(key: str) -> npt.NDArray[np.uint8]:
        return bytes_to_model_input(store.get_bytes(key), spec).astype(np.uint8)

    keys = list(rows["key"])
    if not keys:
        return np.zeros((0, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(one, keys)))
