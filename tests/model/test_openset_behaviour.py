"""Open-set behaviour on real photos, through the shipped path: the default training recipe
on the reference dataset with ood-dev as its ``negatives`` source fits and calibrates the
detector, the model is logged to MLflow and loaded back by the Predictor, and the served
answers are checked: clear everyday objects of the negatives' *test* split (never fitted on)
are ``unknown``; the dandelions of the reference test split are answered.

Slow: the full default training (the backbone over about 1800 views of photos; the session
fixture ``default_predictor``, shared with the explanations' deletion test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.labels import UNKNOWN

pytestmark = pytest.mark.slow

CLEAR_OBJECTS = (
    "objects/n02676566_acoustic_guitar.jpg",
    "objects/n02787622_banjo.jpg",
    "objects/n03018349_china_cabinet.jpg",
    "objects/n03721384_marimba.jpg",
    "objects/n03769881_minibus.jpg",
    "objects/n04372370_switch.jpg",
)


def test_clear_objects_are_unknown(default_predictor: Any, model_env: Any, ood_dir: Path) -> None:
    m = model_env.manifest
    tested = {
        f"{Path(s).parent.name}/{Path(s).name}"
        for s in m[(m["label"] == UNKNOWN) & (m["split"] == "test")]["source"]
    }
    names = [n for n in CLEAR_OBJECTS if n in tested]  # never fitted on
    assert len(names) >= 3, "the negatives' split changed: pick clear objects of its test part"
    preds = default_predictor.predict_bytes([(ood_dir / n).read_bytes() for n in names])
    answers = {
        n: (default_predictor.decide(p).label, p.ood_score)
        for n, p in zip(names, preds, strict=True)
    }
    assert all(a == UNKNOWN for a, _ in answers.values()), answers


def test_test_split_dandelions_are_answered(
    default_predictor: Any, test_split: Any, model_env: Any
) -> None:
    dandelions = test_split[test_split["label"] == "dandelion"]
    blobs = [model_env.store.get_bytes(k) for k in dandelions["key"]]
    answers = [default_predictor.decide(p).label for p in default_predictor.predict_bytes(blobs)]
    unknown = [k for k, a in zip(dandelions["key"], answers, strict=True) if a == UNKNOWN]
    # calibrated to keep 97 % of the val split; allow for the small test split
    assert len(unknown) <= 0.10 * len(dandelions), unknown
    assert answers.count("dandelion") >= 0.9 * len(dandelions)
