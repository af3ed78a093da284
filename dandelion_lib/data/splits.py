"""Splitting out-of-domain photos (negatives) into a part that may be fitted or calibrated on
and a part used only for evaluation: deterministic by content hash and seed, stratified by
group (folder)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from dandelion_lib.core.errors import DandelionError


class SplitError(DandelionError):
    """The photos cannot be split as asked."""


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_ood(
    sha256s: Sequence[str],
    groups: Sequence[str],
    *,
    seed: int = 0,
    fit_fraction: float = 0.5,
) -> list[str]:
    """Split out-of-domain photos into ``"fit"`` and ``"eval"``, stratified by group.

    Within each group (e.g. the folder ``daisy``), photos are ordered by
    ``sha256(f"{seed}:{content sha256}")``; the first ``round(n * fit_fraction)`` go to
    ``fit`` (may be used to fit, calibrate or choose anything), the rest to ``eval``
    (evaluation only). The result depends only on the contents, groups and seed, not on
    file names or listing order. Identical contents in one group stay together.
    """
    if len(sha256s) != len(groups):
        raise SplitError("sha256s and groups must have the same length")
    if not 0.0 <= fit_fraction <= 1.0:
        raise SplitError(f"fit_fraction must be in [0, 1], got {fit_fraction}")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [""] * len(sha256s)
    for idx in members.values():
        ranked = sorted(
            idx,
            key=lambda i: (hashlib.sha256(f"{seed}:{sha256s[i]}".encode()).hexdigest(), i),
        )
        n_fit = round(len(ranked) * fit_fraction)
        cut_key = None
        for pos, i in enumerate(ranked):
            # a duplicate of the last fit photo stays in fit
            if pos < n_fit or sha256s[i] == cut_key:
                out[i] = "fit"
                cut_key = sha256s[i]
            else:
                out[i] = "eval"
    return out
