"""Near-duplicate groups by multi-index hashing (dandelion_lib.data.neardup) give exactly the
groups of the pairwise reference, on random and on clustered hashes, at every distance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dandelion_lib.data import dataset, neardup
from dandelion_lib.data.neardup import near_duplicate_groups

DEFAULT_DISTANCE = 8  # IngestSettings.near_duplicate_distance


def near_duplicate_groups_quadratic(
    sha256s: list[str], phashes: list[str], max_distance: int
) -> list[str]:
    """The pairwise O(N²) grouping that multi-index hashing replaced (dataset.py before it):
    every hash compared with every later one, union-find, the smallest sha256 names a group."""
    n = len(sha256s)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n > 1 and max_distance >= 0:
        values = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
        bytes_ = values.view(np.uint8).reshape(n, 8)
        popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
        for i in range(n - 1):
            dist = popcount[bytes_[i + 1 :] ^ bytes_[i]].sum(axis=1)
            for j in np.nonzero(dist <= max_distance)[0]:
                a, b = find(i), find(i + 1 + int(j))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots: dict[int, str] = {}
    for i in range(n):
        r = find(i)
        if r not in roots or sha256s[i] < roots[r]:
            roots[r] = sha256s[i]
    return [roots[find(i)][:16] for i in range(n)]


def _shas(n: int, seed: int) -> list[str]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(n)]


def _hex(values: np.ndarray) -> list[str]:
    return [f"{int(v):016x}" for v in values]


def _flip(rng: np.random.Generator, value: int, bits: int) -> int:
    for b in rng.choice(64, size=bits, replace=False):
        value ^= 1 << int(b)
    return value


def _random(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return _hex(rng.integers(0, 2**64, size=n, dtype=np.uint64))


def _clustered(n: int, seed: int) -> list[str]:
    """Clusters of variants 0-12 bits from their centre, chains (each link a few bits from the
    last, so the ends are far apart but grouped), exact copies, and random hashes."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        centre = int(rng.integers(0, 2**64, dtype=np.uint64))
        kind = rng.integers(0, 4)
        if kind == 0:  # a cluster
            out += [
                _flip(rng, centre, int(rng.integers(0, 13))) for _ in range(rng.integers(2, 30))
            ]
        elif kind == 1:  # a chain
            link = centre
            for _ in range(rng.integers(2, 12)):
                link = _flip(rng, link, int(rng.integers(1, 9)))
                out.append(link)
        elif kind == 2:  # exact copies
            out += [centre] * int(rng.integers(2, 20))
        else:
            out.append(centre)
    rng.shuffle(out)
    return [f"{v:016x}" for v in out[:n]]


@pytest.mark.parametrize("distance", [0, 1, 3, DEFAULT_DISTANCE, 12, 20])
@pytest.mark.parametrize("make", [_random, _clustered])
def test_same_groups_as_pairwise(make: object, distance: int) -> None:
    phashes = make(1500, distance)  # type: ignore[operator]
    shas = _shas(len(phashes), distance)
    expected = near_duplicate_groups_quadratic(shas, phashes, distance)
    assert near_duplicate_groups(shas, phashes, distance) == expected
    if make is _clustered and distance >= 3:
        assert len(set(expected)) < len(expected) * 0.8  # the case has groups to find


@pytest.mark.parametrize(
    ("widths", "radius", "distance"),
    [
        ([22, 21, 21], 2, DEFAULT_DISTANCE),  # a million hashes: three tables, within 2 bits
        ([16, 16, 16, 16], 2, DEFAULT_DISTANCE),
        ([8] * 8, 1, DEFAULT_DISTANCE),
        ([32, 32], 1, 3),  # blocks too wide for a table: sorted arrays
        ([40, 24], 0, 1),
    ],
)
def test_every_block_plan_finds_the_same_groups(
    widths: list[int], radius: int, distance: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(neardup, "plan_blocks", lambda n, d: (widths, radius))
    phashes = _clustered(800, 7)
    shas = _shas(len(phashes), 7)
    expected = near_duplicate_groups_quadratic(shas, phashes, distance)
    assert near_duplicate_groups(shas, phashes, distance) == expected


def test_bounded_chunks_and_folded_edges_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neardup, "_CHUNK", 7)
    monkeypatch.setattr(neardup, "_EDGES_KEPT", 5)
    phashes = _clustered(600, 3)
    shas = _shas(len(phashes), 3)
    expected = near_duplicate_groups_quadratic(shas, phashes, DEFAULT_DISTANCE)
    assert near_duplicate_groups(shas, phashes, DEFAULT_DISTANCE) == expected


@pytest.mark.parametrize("distance", [1, 2, DEFAULT_DISTANCE, 12, 30])
def test_every_plan_keeps_the_pigeonhole(distance: int) -> None:
    for n in (2, 100, 2_000, 50_000, 1_000_000):
        widths, radius = neardup.plan_blocks(n, distance)
        assert sum(widths) == 64 and len(widths) * (radius + 1) > distance
    # few hashes: exact lookups in d + 1 blocks; a million: three tables, within 2 bits
    assert neardup.plan_blocks(100, DEFAULT_DISTANCE) == ([8] + [7] * 8, 0)
    assert neardup.plan_blocks(1_000_000, DEFAULT_DISTANCE) == ([22, 21, 21], 2)


def test_edge_cases() -> None:
    shas = _shas(5, 0)
    same = ["00000000000000ff"] * 5
    assert near_duplicate_groups(shas, same, 0) == [min(shas)[:16]] * 5
    assert near_duplicate_groups(shas, same, -1) == [s[:16] for s in shas]
    far = ["0000000000000000", "ffffffffffffffff", "00000000ffffffff", "0f0f0f0f0f0f0f0f", "1"]
    assert near_duplicate_groups(shas, far, 64) == [min(shas)[:16]] * 5
    assert near_duplicate_groups(shas, far, 63) == near_duplicate_groups_quadratic(shas, far, 63)
    assert near_duplicate_groups([], [], 8) == [] and near_duplicate_groups(shas[:1], far[:1], 8)
    assert dataset.near_duplicate_groups is near_duplicate_groups
