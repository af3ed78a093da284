"""Feature store: backbone embeddings per image, cached in the object store.

An embedding depends on the image's bytes, the feature spec (model-input contract) and the
backbone (its architecture and its weights). :func:`feature_key` digests the last two into
one *key*; the image is named by its sha256. So a cached embedding is valid exactly as long
as its key and image sha256 match: invalidation is by key, never by hand. A changed spec,
another backbone or other weights give another key, and nothing of the old one is reused.

Layout under the store (``<key>`` is 32 hex digits)::

    features/<key>/key.json                  what the key digests (spec, backbone, weights)
    features/<key>/shards/<id>.npz           embeddings (float32, n x dim), one writer's batch
    features/<key>/manifests/<id>.json       the index of shard <id>: its sha256, its shape
                                             and one row per embedding [image sha256, view]
    features/<key>/index/<id>.json           a compacted index: every manifest of the key at
                                             the time it was written, in one object
    features/<key>/converted/<variant>.bin   the backbone converted once for extraction (e.g.
    features/<key>/converted/<variant>.json  to ONNX; ``<variant>`` digests the converter's
                                             versions) and its record: its sha256, the
                                             difference measured against the original

``<id>`` is unique per write (time + random), so concurrent writers of the same key never
overwrite each other. A writer stores the shard first and its manifest second: a crashed
writer leaves at most an unindexed shard, never a manifest entry pointing at a missing
shard. Readers merge every manifest of the key into one index (image sha256, view) ->
(shard, row); an embedding written twice by two writers is taken from either (both were
computed from the same inputs).

**Compaction** (:meth:`FeatureStore.compact`, run by the DAGs' ``plan_features`` step before
the mapped extraction tasks) merges every manifest into one compacted index object and removes
older compacted indexes; manifests stay (they say which shards are live). A reader lists the
manifests (one paginated listing), reads the newest compacted index once and reads only the
manifests it does not cover. A mapped extraction task goes further: it opens the store
*pinned* to the compacted index its plan names (``index=``) and reads that one object plus
what it writes itself, never listing or reading the other tasks' manifests, so its reads do not
grow with the number of shards. Manifests are never rewritten, so each instance reads each
one at most once.

``view`` names which view of the image was embedded: ``"none"`` for the unaugmented image,
``aug<n>-<digest>`` for augmented view ``n`` (see :func:`dandelion_lib.training.extraction.augmented_view_name`).

A shard that is missing, unreadable or does not match the sha256 its manifest records is
never used: its manifest is dropped from the store and its rows count as missing, so the
caller computes them again and writes them anew. A store that cannot be reached drops
nothing (its rows count as missing for this read only).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dandelion_lib.core.features import FeatureSpec
from dandelion_lib.core.storage import (
    ObjectNotFoundError,
    ObjectStore,
    StoreError,
    StoreUnavailableError,
    sha256_hex,
)

log = logging.getLogger(__name__)

PREFIX = "features"
FORMAT_VERSION = 1
"""Bumped when the meaning of a stored embedding changes (e.g. the extraction graph)."""
UNAUGMENTED = "none"
"""The view name of the unaugmented image."""


def weights_digest(model: Any) -> str:
    """sha256 over the model's weight arrays (dtype, shape and values, in order).

    Computed from the weights as they are now (once per training, before any weight
    changes), so a model whose weights changed gets another digest.
    """

    h = hashlib.sha256()
    for w in model.get_weights():
        a = np.ascontiguousarray(w)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def key_inputs(spec: FeatureSpec, backbone_name: str, weights_sha256: str) -> dict[str, Any]:
    """What a feature key digests (stored as ``key.json`` beside the embeddings)."""
    return {
        "format": FORMAT_VERSION,
        "feature_spec": spec.to_dict(),
        "backbone": backbone_name,
        "weights_sha256": weights_sha256,
    }


def feature_key(spec: FeatureSpec, backbone_name: str, weights_sha256: str) -> str:
    """The key of embeddings of ``spec``'s model inputs through this backbone and weights."""
    inputs = key_inputs(spec, backbone_name, weights_sha256)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Entry:
    shard: str
    row: int


class FeatureStore:
    """Embeddings of one key in an object store (layout: see the module docstring)."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        *,
        inputs: dict[str, Any] | None = None,
        index: str | None = None,
    ):
        if not _is_hex(key):
            raise ValueError(f"feature key must be hex digits, not {key!r}")
        self.store = store
        self.key = key
        self.root = f"{PREFIX}/{key}"
        self.inputs = inputs
        self.pinned = index
        """A compacted index this instance reads instead of listing the manifests, or None."""
        self._read: dict[str, dict[str, Any]] = {}  # manifests read or written, by shard id
        self._compacted: tuple[str, dict[str, dict[str, Any]]] | None = None
        self._dropped: set[str] = set()
        self._key_written = False

    # -- index -----------------------------------------------------------------------------

    def _manifest_key(self, shard_id: str) -> str:
        return f"{self.root}/manifests/{shard_id}.json"

    def _shard_key(self, shard_id: str) -> str:
        return f"{self.root}/shards/{shard_id}.npz"

    def _manifests(self) -> dict[str, dict[str, Any]]:
        """Every readable manifest of the key, by shard id (oldest id first). Pinned: the
        compacted index and this instance's own writes, nothing listed."""
        if self.pinned is not None:
            known = {**self._load_compacted(self.pinned), **self._read}
            return {i: known[i] for i in sorted(known) if i not in self._dropped}
        prefix = f"{self.root}/manifests/"
        live = [n[len(prefix) :].removesuffix(".json") for n in self.store.list(prefix)]
        compacted = self._newest_compacted()
        found: dict[str, dict[str, Any]] = {}
        for shard_id in sorted(live):
            manifest = self._read.get(shard_id) or compacted.get(shard_id)
            if manifest is None:
                manifest = self._read_manifest(shard_id)
            if manifest is not None:
                found[shard_id] = manifest
        return found

    def _read_manifest(self, shard_id: str) -> dict[str, Any] | None:
        name = self._manifest_key(shard_id)
        try:
            manifest = self.store.get_json(name)
            rows = manifest["rows"]
            if not isinstance(rows, list) or not isinstance(manifest["sha256"], str):
                raise ValueError("bad manifest")
        except StoreUnavailableError as exc:  # the store, not the manifest: keep it
            log.warning("feature manifest %s unreachable (%s); skipped", name, exc)
            return None
        except (StoreError, ValueError, KeyError, TypeError) as exc:
            log.warning("feature manifest %s unreadable (%s); dropped", name, exc)
            self._drop(shard_id)
            return None
        self._read[shard_id] = manifest
        return dict(manifest)

    def _index_keys(self) -> list[str]:
        return sorted(self.store.list(f"{self.root}/index/"))

    def _newest_compacted(self) -> dict[str, dict[str, Any]]:
        names = self._index_keys()
        return self._load_compacted(names[-1]) if names else {}

    def _load_compacted(self, name: str) -> dict[str, dict[str, Any]]:
        """The manifests a compacted index holds (read once per instance); none when it is
        unreadable (then the manifests are read one by one, or, pinned, recomputed)."""
        if self._compacted is not None and self._compacted[0] == name:
            return self._compacted[1]
        try:
            doc = self.store.get_json(name)
            manifests = dict(doc["manifests"])
        except (StoreError, ValueError, KeyError, TypeError) as exc:
            log.warning("compacted feature index %s unusable (%s); ignored", name, exc)
            manifests = {}
        self._compacted = (name, manifests)
        return manifests

    def compact(self) -> str:
        """Merge every manifest of the key into one compacted index object; returns its key
        (what :class:`FeatureStore` takes as ``index=``). Older compacted indexes are removed
        once it is written."""
        older = self._index_keys()
        manifests = self._manifests()
        name = f"{self.root}/index/{_new_id()}.json"
        self.store.put_json(name, {"format": FORMAT_VERSION, "manifests": manifests})
        for old in older:
            try:
                self.store.delete(old)
            except StoreError as exc:  # pragma: no cover - the next compaction removes it
                log.warning("cannot delete %s: %s", old, exc)
        self._compacted = (name, manifests)
        return name

    def index(
        self, manifests: dict[str, dict[str, Any]] | None = None
    ) -> dict[tuple[str, str], _Entry]:
        """(image sha256, view) -> where its embedding is; the first shard id wins."""
        entries: dict[tuple[str, str], _Entry] = {}
        manifests = self._manifests() if manifests is None else manifests
        for shard_id, manifest in manifests.items():
            for row, (sha, view) in enumerate(manifest["rows"]):
                entries.setdefault((str(sha), str(view)), _Entry(shard_id, row))
        return entries

    def _drop(self, shard_id: str) -> None:
        """Forget a shard: its manifest first (readers stop using it), then its data."""
        self._dropped.add(shard_id)
        self._read.pop(shard_id, None)
        for name in (self._manifest_key(shard_id), self._shard_key(shard_id)):
            try:
                self.store.delete(name)
            except StoreError as exc:  # pragma: no cover - the next reader drops it again
                log.warning("cannot delete %s: %s", name, exc)

    def _load_shard(self, shard_id: str, manifest: dict[str, Any]) -> npt.NDArray[np.float32]:
        data = self.store.get_bytes(self._shard_key(shard_id))
        if sha256_hex(data) != manifest["sha256"]:
            raise ValueError("shard does not match the sha256 its manifest records")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            array = np.asarray(npz["embeddings"], dtype=np.float32)
        if array.ndim != 2 or array.shape[0] != len(manifest["rows"]):
            raise ValueError(f"shard shape {array.shape} does not match its manifest")
        return array

    # -- reads and writes ------------------------------------------------------------------

    def get(
        self, shas: Sequence[str], view: str = UNAUGMENTED
    ) -> tuple[npt.NDArray[np.float32] | None, list[str]]:
        """The cached embeddings of ``shas`` (one ``view``) and the shas not cached.

        Returns ``(found, missing)``: ``found`` has one row per sha of ``shas`` (in order;
        rows of missing shas are zeros) or is ``None`` when nothing was found; ``missing``
        lists the shas to compute, in order, without duplicates. A corrupt shard is dropped
        and its rows reported missing.
        """

        manifests = self._manifests()
        index = self.index(manifests)
        wanted: dict[str, list[int]] = {}
        for i, sha in enumerate(shas):
            entry = index.get((sha, view))
            if entry is not None:
                wanted.setdefault(entry.shard, []).append(i)
        found: npt.NDArray[np.float32] | None = None
        hit = np.zeros(len(shas), bool)
        for shard_id, positions in wanted.items():
            try:
                array = self._load_shard(shard_id, manifests[shard_id])
            except StoreUnavailableError as exc:  # the store, not the shard: keep it
                log.warning("feature shard %s unreachable (%s); computed instead", shard_id, exc)
                continue
            except (StoreError, ValueError, OSError, KeyError) as exc:
                log.warning("feature shard %s unusable (%s); dropped", shard_id, exc)
                self._drop(shard_id)
                continue
            if found is None:
                found = np.zeros((len(shas), array.shape[1]), np.float32)
            elif array.shape[1] != found.shape[1]:
                log.warning("feature shard %s has another width; dropped", shard_id)
                self._drop(shard_id)
                continue
            for i in positions:
                found[i] = array[index[(shas[i], view)].row]
                hit[i] = True
        missing = list(dict.fromkeys(sha for sha, ok in zip(shas, hit, strict=True) if not ok))
        return (found if hit.any() else None), missing

    def put(self, shas: Sequence[str], view: str, array: npt.ArrayLike) -> str | None:
        """Store the embeddings of ``shas`` (one row each) as a new shard; returns its id
        (``None`` when there is nothing to store)."""

        embeddings = np.asarray(array, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(shas):
            raise ValueError(
                f"{len(shas)} image sha256s but embeddings of shape {embeddings.shape}"
            )
        if not len(shas):
            return None
        if self.inputs is not None and not self._key_written:
            if not self.store.exists(f"{self.root}/key.json"):
                self.store.put_json(f"{self.root}/key.json", self.inputs)
            self._key_written = True
        shard_id = _new_id()
        buffer = io.BytesIO()
        np.savez(buffer, embeddings=embeddings)
        data = buffer.getvalue()
        self.store.put_bytes(self._shard_key(shard_id), data)  # the shard first ...
        manifest = {
            "format": FORMAT_VERSION,
            "sha256": sha256_hex(data),
            "shape": list(embeddings.shape),
            "rows": [[str(sha), view] for sha in shas],
        }
        self.store.put_json(self._manifest_key(shard_id), manifest)  # ... then its index
        self._read[shard_id] = manifest
        return shard_id

    # -- the converted backbone -------------------------------------------------------------

    def _converted_keys(self, variant: str) -> tuple[str, str]:
        if not _is_hex(variant):
            raise ValueError(f"converted-backbone variant must be hex digits, not {variant!r}")
        return f"{self.root}/converted/{variant}.bin", f"{self.root}/converted/{variant}.json"

    def get_converted(self, variant: str) -> tuple[bytes, dict[str, Any]] | None:
        """The backbone as :meth:`put_converted` stored it for ``variant`` (what converted
        it), and its record; None when absent, unreadable or not the bytes its record names
        (then the caller converts again and overwrites it)."""
        data_key, record_key = self._converted_keys(variant)
        try:
            record = self.store.get_json(record_key)
            data = self.store.get_bytes(data_key)
        except ObjectNotFoundError:
            return None
        except (StoreError, ValueError) as exc:
            log.warning("converted backbone %s unusable (%s); converting again", data_key, exc)
            return None
        if not isinstance(record, dict) or record.get("sha256") != sha256_hex(data):
            log.warning("converted backbone %s is not what its record names", data_key)
            return None
        return data, record

    def put_converted(self, variant: str, data: bytes, record: dict[str, Any]) -> None:
        """Store the backbone converted for ``variant`` (e.g. an ONNX graph of its features)
        with ``record`` (what was measured of it): the bytes first, then the record with their
        sha256, so a reader finds both or neither. An unreachable store stores nothing."""
        data_key, record_key = self._converted_keys(variant)
        try:
            self.store.put_bytes(data_key, data)
            self.store.put_json(record_key, {**record, "sha256": sha256_hex(data)})
        except StoreError as exc:  # an optimisation: the next reader converts again
            log.warning("cannot store the converted backbone of key %s: %s", self.key, exc)


def _is_hex(text: str) -> bool:
    """Lower-case hex digits, at least one: a name that is safe inside an object key."""
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def _new_id() -> str:
    """Unique per write (time + pid + random), sorting by time."""
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def cached_embeddings(
    fstore: FeatureStore | None,
    shas: Sequence[str],
    compute: Any,
    *,
    view: str = UNAUGMENTED,
) -> tuple[npt.NDArray[np.float32], int, int]:
    """Embeddings of ``shas``: cached ones read, missing ones computed and stored.

    ``compute(positions)`` returns the embeddings of the images at those positions of
    ``shas``. Returns ``(embeddings, cached, computed)`` (counts of images). Without a
    feature store every embedding is computed.
    """

    if fstore is None:
        return compute(list(range(len(shas)))), 0, len(shas)
    found, missing = fstore.get(shas, view)
    if not missing:
        assert found is not None or not shas
        return (found if found is not None else compute([])), len(shas), 0
    todo = set(missing)
    positions = [i for i, sha in enumerate(shas) if sha in todo]
    fresh = np.asarray(compute(positions), np.float32)
    out = np.zeros((len(shas), fresh.shape[1]), np.float32)
    if found is not None:
        out[:] = found
    out[positions] = fresh
    first: dict[str, int] = {}
    for p in positions:
        first.setdefault(shas[p], p)
    try:
        fstore.put(list(first), view, out[list(first.values())])
    except StoreError as exc:  # the cache is an optimisation: training goes on without it
        log.warning("cannot store features of key %s: %s", fstore.key, exc)
    return out, len(shas) - len(positions), len(positions)


def shard_groups(shards: int, max_groups: int) -> list[tuple[int, int]]:
    """``shards`` consecutive shards in at most ``max_groups`` runs ``[first, stop)`` of
    nearly equal length (they differ by one at most), in order; at least one run."""
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, not {max_groups}")
    shards = max(shards, 1)
    groups = min(shards, max_groups)
    base, extra = divmod(shards, groups)
    out, first = [], 0
    for g in range(groups):
        stop = first + base + (1 if g < extra else 0)
        out.append((first, stop))
        first = stop
    return out
