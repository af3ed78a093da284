"""The negatives' split (fit / eval): deterministic, stratified, duplicates kept together."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from dandelion_lib.data.splits import SplitError, split_ood


def _sha(i: int, group: str) -> str:
    return hashlib.sha256(f"{group}-{i}".encode()).hexdigest()


def _ood_listing() -> tuple[list[str], list[str]]:
    sizes = {"objects": 160, "daisy": 35, "sunflowers": 35, "tulips": 35, "roses": 35}
    shas, groups = [], []
    for g, n in sizes.items():
        for i in range(n):
            shas.append(_sha(i, g))
            groups.append(g)
    return shas, groups


def test_split_is_deterministic_and_independent_of_order() -> None:
    shas, groups = _ood_listing()
    first = split_ood(shas, groups, seed=0)
    assert split_ood(shas, groups, seed=0) == first
    order = np.random.default_rng(1).permutation(len(shas))
    shuffled = split_ood([shas[i] for i in order], [groups[i] for i in order], seed=0)
    assert {shas[i]: s for i, s in zip(order, shuffled, strict=True)} == dict(
        zip(shas, first, strict=True)
    )
    assert split_ood(shas, groups, seed=1) != first


def test_split_is_stratified_by_group() -> None:
    shas, groups = _ood_listing()
    parts = split_ood(shas, groups, seed=0, fit_fraction=0.5)
    counts = Counter(zip(groups, parts, strict=True))
    assert counts[("objects", "fit")] == counts[("objects", "eval")] == 80
    for g in ("daisy", "sunflowers", "tulips", "roses"):
        assert counts[(g, "fit")] == round(35 * 0.5)
        assert counts[(g, "fit")] + counts[(g, "eval")] == 35
    assert set(parts) == {"fit", "eval"}


def test_split_keeps_identical_contents_together() -> None:
    shas = ["a" * 64, "a" * 64, "b" * 64, "c" * 64]
    for seed in range(20):
        parts = split_ood(shas, ["g"] * 4, seed=seed, fit_fraction=0.25)
        assert parts[0] == parts[1]


def test_split_rejects_bad_input() -> None:
    with pytest.raises(SplitError, match="same length"):
        split_ood(["a"], ["g", "h"])
    with pytest.raises(SplitError, match="fit_fraction"):
        split_ood(["a"], ["g"], fit_fraction=1.5)
