"""The feature store on both store backends (local folder and the loopback S3 server)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dandelion_lib.core.features import FeatureSpec
from dandelion_lib.data.featurestore import (
    FeatureStore,
    cached_embeddings,
    feature_key,
    weights_digest,
)
from tests.store_support import CountingStore

SHAS = [f"{i:064x}" for i in range(5)]


def _embeddings(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _key() -> str:
    return feature_key(FeatureSpec(labels=("dandelion", "grass")), "tiny", "0" * 64)


def test_round_trip(store: Any) -> None:
    fs = FeatureStore(store, _key(), inputs={"backbone": "tiny"})
    emb = _embeddings(5)
    fs.put(SHAS, "none", emb)
    found, missing = fs.get(SHAS, "none")
    assert missing == []
    np.testing.assert_array_equal(found, emb)
    # A subset in another order, with an unknown image and a duplicate.
    other = f"{99:064x}"
    found, missing = fs.get([SHAS[3], other, SHAS[0], SHAS[3]], "none")
    assert missing == [other]
    np.testing.assert_array_equal(found[[0, 2, 3]], emb[[3, 0, 3]])
    # Another view of the same images is not cached.
    assert fs.get(SHAS, "seed-1") == (None, SHAS)
    # The layout: key.json, one shard, one manifest.
    names = sorted(store.list(f"features/{fs.key}/"))
    assert [n.split("/")[2] for n in names] == ["key.json", "manifests", "shards"]
    assert store.get_json(f"features/{fs.key}/key.json") == {"backbone": "tiny"}


def test_concurrent_writers_of_one_key_both_land(store: Any) -> None:
    a, b = FeatureStore(store, _key()), FeatureStore(store, _key())
    emb = _embeddings(5)
    a.put(SHAS[:3], "none", emb[:3])
    b.put(SHAS[2:], "none", emb[2:])  # overlaps on SHAS[2]
    found, missing = FeatureStore(store, _key()).get(SHAS)
    assert missing == []
    np.testing.assert_array_equal(found, emb)


def test_a_shard_without_manifest_is_never_used(store: Any) -> None:
    """A writer that crashed between the shard and its manifest leaves nothing indexed."""
    fs = FeatureStore(store, _key())
    store.put_bytes(f"features/{fs.key}/shards/crashed.npz", b"half a shard")
    assert fs.get(SHAS) == (None, SHAS)


def test_a_corrupt_shard_is_detected_dropped_and_recomputed(store: Any) -> None:
    fs = FeatureStore(store, _key())
    emb = _embeddings(5)
    shard = fs.put(SHAS, "none", emb)
    # Rewrite the shard through the store (so the store's own digest matches the new
    # bytes): only the manifest's sha256 can tell.
    bad = _embeddings(5, seed=1)
    import io

    buf = io.BytesIO()
    np.savez(buf, embeddings=bad)
    store.put_bytes(f"features/{fs.key}/shards/{shard}.npz", buf.getvalue())
    found, missing = fs.get(SHAS)
    assert found is None and missing == SHAS
    assert not store.exists(f"features/{fs.key}/manifests/{shard}.json")

    computed: list[list[int]] = []

    def compute(positions: list[int]) -> np.ndarray:
        computed.append(positions)
        return emb[positions]

    out, cached, fresh = cached_embeddings(fs, SHAS, compute)
    assert (cached, fresh, computed) == (0, 5, [[0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(out, emb)
    out, cached, fresh = cached_embeddings(fs, SHAS, compute)
    assert (cached, fresh, len(computed)) == (5, 0, 1)
    np.testing.assert_array_equal(out, emb)


def test_a_corrupt_object_in_a_local_store_is_detected(tmp_path: Any) -> None:
    from dandelion_lib.core.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    fs = FeatureStore(store, _key())
    shard = fs.put(SHAS, "none", _embeddings(5))
    path = tmp_path / "store" / "features" / fs.key / "shards" / f"{shard}.npz"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert fs.get(SHAS) == (None, SHAS)


def test_only_missing_embeddings_are_computed(store: Any) -> None:
    fs = FeatureStore(store, _key())
    emb = _embeddings(5)
    fs.put(SHAS[:4], "none", emb[:4])
    asked: list[list[int]] = []

    def compute(positions: list[int]) -> np.ndarray:
        asked.append(positions)
        return emb[positions]

    out, cached, computed = cached_embeddings(fs, SHAS, compute)
    assert (cached, computed, asked) == (4, 1, [[4]])
    np.testing.assert_array_equal(out, emb)
    # Without a store everything is computed.
    out, cached, computed = cached_embeddings(None, SHAS, compute)
    assert (cached, computed) == (0, 5)


class _Weights:
    def __init__(self, *arrays: np.ndarray):
        self.arrays = list(arrays)

    def get_weights(self) -> list[np.ndarray]:
        return self.arrays


def test_the_key_changes_with_spec_backbone_and_weights() -> None:
    spec = FeatureSpec(labels=("dandelion", "grass"))
    w1 = weights_digest(_Weights(np.zeros((2, 2), np.float32)))
    w2 = weights_digest(_Weights(np.ones((2, 2), np.float32)))
    w3 = weights_digest(_Weights(np.zeros((4,), np.float32)))  # same bytes, another shape
    assert len({w1, w2, w3}) == 3
    assert weights_digest(_Weights(np.zeros((2, 2), np.float32))) == w1
    keys = {
        feature_key(spec, "lite0", w1),
        feature_key(spec, "lite0", w2),
        feature_key(spec, "other", w1),
        feature_key(FeatureSpec(labels=("dandelion", "grass"), image_size=160), "lite0", w1),
    }
    assert len(keys) == 4
    assert feature_key(spec, "lite0", w1) == feature_key(spec, "lite0", w1)


def test_bad_arguments_are_refused(store: Any) -> None:
    with pytest.raises(ValueError, match="hex"):
        FeatureStore(store, "../escape")
    fs = FeatureStore(store, _key())
    with pytest.raises(ValueError, match="shape"):
        fs.put(SHAS, "none", _embeddings(4))
    assert fs.put([], "none", np.zeros((0, 3), np.float32)) is None


# --- compaction: one compacted index instead of every manifest ---------------------------


def _fill(store: Any, writes: int) -> FeatureStore:
    """``writes`` shards of one embedding each, by as many writers."""
    for i in range(writes):
        FeatureStore(store, _key()).put([f"{i:064x}"], "none", _embeddings(1, seed=i))
    return FeatureStore(store, _key())


@pytest.mark.parametrize("writes", [3, 30])
def test_a_compacted_index_is_read_instead_of_every_manifest(store: Any, writes: int) -> None:
    counting = CountingStore(store)
    _fill(counting, writes).compact()
    counting.reset()
    reader = FeatureStore(counting, _key())
    shas = [f"{i:064x}" for i in range(writes)]
    found, missing = reader.get(shas)
    assert missing == [] and found is not None
    np.testing.assert_array_equal(found[-1], _embeddings(1, seed=writes - 1)[0])
    # one listing of the manifests, one of the compacted indexes, the index, then the shards
    manifest_reads = [k for k in counting.read_keys if "/manifests/" in k]
    assert manifest_reads == [] and counting.calls["list"] == 2
    assert counting.calls["get"] == 1 + writes

    # a later write is read on its own; a pinned reader never lists and sees only the index
    _fill(counting, writes + 1)  # rewrites 0..writes-1 (harmless copies) and adds one
    counting.reset()
    again = FeatureStore(counting, _key()).index()
    assert len(again) == writes + 1
    assert len([k for k in counting.read_keys if "/manifests/" in k]) == writes + 1
    index_key = next(iter(store.list(f"features/{_key()}/index/")))
    counting.reset()
    pinned = FeatureStore(counting, _key(), index=index_key)
    assert len(pinned.index()) == writes and counting.calls["list"] == 0
    pinned.put([f"{999:064x}"], "none", _embeddings(1))
    assert (f"{999:064x}", "none") in pinned.index() and counting.calls["get"] == 1


def test_compaction_keeps_one_index_and_drops_stay_dropped(store: Any) -> None:
    fs = _fill(store, 4)
    fs.compact()
    first = fs.compact()
    assert list(store.list(f"features/{fs.key}/index/")) == [first]
    # a shard of the compacted index goes bad: dropped, recomputed, never read again
    shard = fs.index()[(SHAS[2], "none")].shard
    store.put_bytes(f"features/{fs.key}/shards/{shard}.npz", b"not a shard")
    found, missing = FeatureStore(store, fs.key).get(SHAS[:4])
    assert missing == [SHAS[2]] and found is not None
    FeatureStore(store, fs.key).put([SHAS[2]], "none", _embeddings(1, seed=2))
    later = FeatureStore(store, fs.key)
    assert later.index()[(SHAS[2], "none")].shard != shard
    assert later.get(SHAS[:4])[1] == []


def test_the_converted_backbone_is_found_whole_or_not_at_all(store: Any) -> None:
    fs = FeatureStore(store, _key())
    variant = "ab" * 16
    assert fs.get_converted(variant) is None  # nothing stored yet
    fs.put_converted(variant, b"graph bytes", {"parity": 1e-6})
    data, record = fs.get_converted(variant) or (b"", {})
    assert data == b"graph bytes" and record["parity"] == 1e-6
    assert FeatureStore(store, _key()).get_converted("cd" * 16) is None  # another converter

    # bytes that are not what the record names (overwritten, or a torn write): not used
    store.put_bytes(f"features/{_key()}/converted/{variant}.bin", b"other bytes")
    assert fs.get_converted(variant) is None
    fs.put_converted(variant, b"graph bytes", {"parity": 1e-6})  # stored anew, whole
    assert fs.get_converted(variant) == (b"graph bytes", record)
    store.put_bytes(f"features/{_key()}/converted/{variant}.json", b"{not json")
    assert fs.get_converted(variant) is None
    with pytest.raises(ValueError, match="hex digits"):
        fs.get_converted("../escape")
