"""Near-duplicate groups in about linear time: multi-index hashing over 64-bit perceptual hashes.

Two images are near-duplicates when their perceptual hashes differ in at most ``max_distance``
(``d``) bits; groups are the connected components of that relation (transitively), and a
group's id is the first 16 hex digits of the smallest sha256 in it.

Comparing every hash with every other is O(N²): hours at a million images. Instead:

1. **Exact duplicates first**: equal hashes are one node (distance 0), so a hash shared by
   many images never makes a huge bucket.
2. **Multi-index hashing** (Norouzi et al., CVPR 2012) on the distinct hashes: the 64 bits are
   cut into ``m`` disjoint blocks. By pigeonhole, two hashes within ``d`` bits differ in at most
   ``r = d // m`` bits in at least one block (else they would differ in at least
   ``m * (r + 1) > d``). Each block's values are indexed (a direct table for blocks of up to
   24 bits, a sorted array beyond); every hash looks up, in every block, each value within
   ``r`` bits of its own; the hashes found are candidates, and each candidate pair is
   verified with its exact popcount.
3. The verified pairs' connected components are the groups, exactly as pairwise comparison
   finds them.

``m`` is chosen per call from a cost model (lookups plus expected candidates for uniformly
spread hashes): with ``d = 8``, for a hundred hashes ``d + 1`` blocks looked up exactly
(``r = 0``), for thousands five blocks within 1 bit, for a million three blocks of 21-22 bits
within 2 bits. The work grows with the number of close pairs too: thousands of distinct hashes
all within ``d`` of each other are millions of true pairs to verify (memory stays bounded: the
candidates are expanded in chunks and the pairs folded into components as they pile up).
``tests/unit/test_neardup.py`` compares the groups with the pairwise O(N²) comparison this
replaced, on random and clustered hashes.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations
from math import comb

import numpy as np
import numpy.typing as npt

HASH_BITS = 64
TABLE_BITS = 24
"""Blocks up to this many bits are indexed by a direct table (2**24 entries: 64 MiB of
offsets and counts); wider ones by a sorted array and binary search."""
_CHUNK = 1 << 20
"""Candidate pairs expanded at once (bounds the memory of a huge bucket)."""
_EDGES_KEPT = 1 << 22
"""Verified pairs kept before they are folded into components (bounds their memory)."""

Index = npt.NDArray[np.intp]


def near_duplicate_groups(sha256s: list[str], phashes: list[str], max_distance: int) -> list[str]:
    """Group images whose perceptual hashes are within ``max_distance`` bits (transitively).

    Returns one group id per image: the first 16 hex digits of the smallest sha256 in its
    group, so ids depend only on content. ``max_distance < 0`` disables grouping.
    """
    n = len(sha256s)
    if n < 2 or max_distance < 0:
        return [s[:16] for s in sha256s]
    values = np.fromiter((int(h, 16) for h in phashes), dtype=np.uint64, count=n)
    distinct, node = np.unique(values, return_inverse=True)
    if max_distance == 0:  # equal hashes only: grouped already
        labels = np.arange(len(distinct), dtype=np.intp)
    elif max_distance >= HASH_BITS:
        labels = np.zeros(len(distinct), dtype=np.intp)
    else:
        labels = _close_components(distinct, max_distance)
    return _group_ids(sha256s, labels[node.reshape(-1)])


def plan_blocks(n: int, max_distance: int) -> tuple[list[int], int]:
    """The block widths (bits, summing to 64) and the radius ``r`` searched in each block,
    chosen for ``n`` distinct hashes: the fewest expected lookups plus candidates."""
    best: tuple[float, list[int], int] | None = None
    for m in range(1, min(max_distance + 1, HASH_BITS) + 1):
        widths = [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]
        radius = max_distance // m
        cost = 0.0
        for w in widths:
            probes = sum(comb(w, k) for k in range(radius + 1))
            lookup = 1.0 if w <= TABLE_BITS else 20.0  # a table read vs a binary search
            cost += probes * n * (lookup + n / 2.0**w)
        if best is None or cost < best[0]:
            best = (cost, widths, radius)
    assert best is not None
    return best[1], best[2]


def _masks(width: int, radius: int) -> Iterator[int]:
    """Every ``width``-bit value with at most ``radius`` bits set (none when ``radius`` < 0)."""
    for k in range(radius + 1):
        for bits in combinations(range(width), k):
            yield sum(1 << b for b in bits)


def _close_components(values: npt.NDArray[np.uint64], max_distance: int) -> Index:
    """The component of each of ``values`` (distinct hashes) under "within ``max_distance``
    bits", by multi-index hashing.

    In each block, the pairs of hashes whose block values differ by a mask of at most
    ``radius`` bits are enumerated once each: a mask's pairs join bucket ``k`` and bucket
    ``k ^ mask`` with ``k`` the one whose bit at the mask's highest bit is 0 (mask 0: the pairs
    within a bucket)."""
    n = len(values)
    widths, radius = plan_blocks(n, max_distance)
    edges = _Edges(n)
    verify = _Verifier(values, max_distance, edges)
    shift = 0
    for width in widths:
        keys = ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.intp)
        shift += width
        index = _BlockIndex(keys, width)
        verify(*index.find(keys), index.order, same_bucket=True)
        for high in range(width):
            below = np.flatnonzero(((keys >> high) & 1) == 0)
            below_keys = keys[below]
            for lower in _masks(high, radius - 1):
                hits, starts, counts = index.find(below_keys ^ ((1 << high) | lower))
                verify(below[hits], starts, counts, index.order, same_bucket=False)
    return edges.components()


class _BlockIndex:
    """The hashes of one block by their value there: ``order`` sorts them by it; ``find``
    says where in ``order`` each query's bucket starts and how many it holds."""

    def __init__(self, keys: Index, width: int):
        self.order = np.argsort(keys, kind="stable")
        self.table = width <= TABLE_BITS
        if self.table:  # a direct table: one read per query, a small one first
            counts = np.bincount(keys, minlength=1 << width)
            self.counts, self.starts = counts, np.cumsum(counts) - counts
            self.occupied = counts > 0
        else:
            self.sorted = keys[self.order]

    def find(self, queries: Index) -> tuple[Index, Index, Index]:
        """(which queries have a bucket, its start in ``order``, its size)."""
        if self.table:
            hits = np.flatnonzero(np.take(self.occupied, queries))
            found = queries[hits]
            return hits, self.starts[found], self.counts[found]
        lo = np.searchsorted(self.sorted, queries, side="left")
        counts = np.searchsorted(self.sorted, queries, side="right") - lo
        hits = np.flatnonzero(counts)
        return hits, lo[hits], counts[hits]


class _Verifier:
    """Checks candidate pairs with their exact popcount and keeps the close ones."""

    def __init__(self, values: npt.NDArray[np.uint64], max_distance: int, edges: _Edges):
        self.values = values
        self.max_distance = max_distance
        self.edges = edges

    def __call__(
        self, items: Index, starts: Index, counts: Index, order: Index, *, same_bucket: bool
    ) -> None:
        """Pair each of ``items`` with every hash of its bucket ``order[start:start + count]``
        (``same_bucket``: its own bucket, each pair once), a bounded number at a time."""
        if not len(items):
            return
        ends = np.cumsum(counts)
        cuts = np.searchsorted(ends, np.arange(_CHUNK, int(ends[-1]), _CHUNK), side="right")
        for part in np.split(np.arange(len(items)), cuts):
            if not len(part):
                continue
            c = counts[part]
            src = np.repeat(items[part], c)
            offsets = np.arange(len(src)) - np.repeat(np.cumsum(c) - c, c)
            dst = order[np.repeat(starts[part], c) + offsets]
            self._check(src, dst, same_bucket)

    def _check(self, src: Index, dst: Index, same_bucket: bool) -> None:
        if same_bucket:
            keep = dst > src
            src, dst = src[keep], dst[keep]
        close = np.bitwise_count(self.values[src] ^ self.values[dst]) <= self.max_distance
        self.edges.add(src[close], dst[close])


class _Edges:
    """Verified pairs of nodes, folded into their components when too many are kept."""

    def __init__(self, n: int):
        self.n = n
        self.src: list[Index] = []
        self.dst: list[Index] = []
        self.kept = 0

    def add(self, src: Index, dst: Index) -> None:
        if len(src):
            self.src.append(src)
            self.dst.append(dst)
            self.kept += len(src)
            if self.kept > _EDGES_KEPT:
                self._fold()

    def _fold(self) -> None:
        """Replace the pairs by one pair (node, its component's first node) per grouped node."""
        labels = self.components()
        first = np.full(labels.max() + 1, self.n, dtype=np.intp)
        np.minimum.at(first, labels, np.arange(self.n))
        rep = first[labels]
        grouped = np.flatnonzero(rep != np.arange(self.n))
        self.src, self.dst, self.kept = [grouped], [rep[grouped]], len(grouped)

    def components(self) -> Index:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not self.kept:
            return np.arange(self.n, dtype=np.intp)
        src, dst = np.concatenate(self.src), np.concatenate(self.dst)
        # int32 weights: a pair found in several blocks sums its weights, never to 0
        graph = coo_matrix((np.ones(len(src), dtype=np.int32), (src, dst)), shape=(self.n, self.n))
        _, labels = connected_components(graph, directed=False)
        out: Index = labels.astype(np.intp)
        return out


def _group_ids(sha256s: list[str], labels: Index) -> list[str]:
    """Each image's group id: the first 16 hex digits of the smallest sha256 of its label."""
    ids = [s[:16] for s in sha256s]
    sizes = np.bincount(labels)
    smallest: dict[int, str] = {}
    members = np.flatnonzero(sizes[labels] > 1)
    for i, label in zip(members.tolist(), labels[members].tolist(), strict=True):
        if label not in smallest or sha256s[i] < smallest[label]:
            smallest[label] = sha256s[i]
    for i, label in zip(members.tolist(), labels[members].tolist(), strict=True):
        ids[i] = smallest[label][:16]
    return ids
