"""The data gate (dandelion_lib.data.datagate) on hand-made manifests."""

from __future__ import annotations

import pandas as pd
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.data.datagate import check_manifest, dataset_counts
from dandelion_lib.data.dataset import MANIFEST_COLUMNS

SETTINGS = Settings(min_images_per_class=2, max_class_imbalance=3.0)


def manifest(
    per_split: dict[str, int], labels: tuple[str, ...] = ("dandelion", "grass")
) -> pd.DataFrame:
    rows = []
    for split, n in per_split.items():
        for label in labels:
            for i in range(n):
                sha = f"{split}-{label}-{i}"
                row = dict.fromkeys(MANIFEST_COLUMNS, 0.5)
                row.update(
                    sha256=sha,
                    label=label,
                    key=f"raw/{label}/{sha}.jpg",
                    source=sha,
                    origin="greenr",
                    width=64,
                    height=64,
                    format="JPEG",
                    bytes=100,
                    ingested_at="t",
                    phash="0" * 16,
                    group=sha,
                    split=split,
                )
                rows.append(row)
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def test_a_sound_manifest_passes() -> None:
    df = manifest({"train": 3, "val": 1, "test": 1})
    assert check_manifest(df, SETTINGS) == []
    counts = dataset_counts(df, SETTINGS.labels)
    assert counts == {
        "images": 10,
        "labels": {"dandelion": 5, "grass": 5},
        "negatives": 0,
        "splits": {"train": 6, "val": 2, "test": 2},
        "origins": {"greenr": {"images": 10, "train": 6, "val": 2, "test": 2}},
    }


def test_negatives_pass_and_are_not_a_class() -> None:
    """The ``negatives`` source (label unknown) is allowed, counted apart, and never makes a
    class too small or the classes unbalanced; its near-duplicates must not straddle."""
    df = manifest({"train": 3, "val": 1, "test": 1})
    neg = manifest({"train": 20, "test": 20}, labels=("unknown",))
    both = pd.concat([df, neg], ignore_index=True)
    assert check_manifest(both, SETTINGS) == []
    counts = dataset_counts(both, SETTINGS.labels)
    assert counts["negatives"] == 40 and counts["labels"] == {"dandelion": 5, "grass": 5}
    # a negative near-duplicate of an in-domain photo in another split is not leakage
    # between the classes' splits...
    both.loc[both["label"] == "unknown", "group"] = both.loc[0, "group"]
    problems = check_manifest(both, SETTINGS)
    # ...but negatives of one group in both of their splits are
    assert problems == ["1 near-duplicate groups straddle splits"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda df: df.drop(columns=["phash"]), "lacks columns"),
        (lambda df: df.iloc[0:0], "empty"),
        (lambda df: df.assign(label=df["label"].replace("grass", "moss")), "unknown labels"),
        (lambda df: df[~((df["split"] == "val") & (df["label"] == "grass"))], "has no 'grass'"),
        (lambda df: df.assign(sha256="same"), "duplicate images"),
        (lambda df: df.assign(group="one"), "straddle splits"),
    ],
    ids=["columns", "empty", "labels", "split-class", "duplicates", "groups"],
)
def test_each_problem_is_named(change, problem: str) -> None:  # type: ignore[no-untyped-def]
    problems = check_manifest(change(manifest({"train": 3, "val": 1, "test": 1})), SETTINGS)
    assert any(problem in p for p in problems), problems
