"""The open-set detector's numpy parts: scoring, calibration, persistence
and the evaluation figures, on synthetic features (no TensorFlow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dandelion_lib.training.openset import (
    ARTIFACT_NAME,
    METHODS,
    OpenSetDetector,
    OpenSetError,
    ood_metrics,
    roc_auc,
    threshold_for_retention,
)

DIM = 32


@pytest.fixture(scope="module")
def domain() -> dict[str, np.ndarray]:
    """Two in-domain clusters (classes 0, 1) and far-away out-of-domain points."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, DIM)) * 3
    ood_centre = rng.normal(size=DIM) * 3

    def cloud(centre: np.ndarray, n: int) -> np.ndarray:
        return (centre + rng.normal(size=(n, DIM))).astype(np.float32)

    train = np.concatenate([cloud(centres[0], 60), cloud(centres[1], 60)])
    val = np.concatenate([cloud(centres[0], 50), cloud(centres[1], 50)])
    ood = cloud(ood_centre, 40)
    negatives = cloud(ood_centre, 30)
    labels = np.repeat([0, 1], 60)
    return {"train": train, "labels": labels, "val": val, "ood": ood, "negatives": negatives}


def _fitted(method: str, domain: dict[str, np.ndarray]) -> OpenSetDetector:
    det = OpenSetDetector(method=method, k=3)  # type: ignore[arg-type]
    det.fit(domain["train"], domain["labels"], negatives=domain["negatives"])
    det.calibrate(domain["val"], 0.97)
    return det


# --- detector --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_detector_separates_clusters(method: str, domain: dict[str, np.ndarray]) -> None:
    det = _fitted(method, domain)
    assert roc_auc(det.score(domain["val"]), det.score(domain["ood"])) > 0.95
    assert det.is_unknown(domain["ood"]).mean() > 0.9
    assert det.is_unknown(domain["val"]).mean() <= 0.03


@pytest.mark.parametrize("method", METHODS)
def test_persistence_round_trip_gives_identical_scores(
    method: str, domain: dict[str, np.ndarray], tmp_path: object
) -> None:
    det = _fitted(method, domain)
    params = json.loads(json.dumps(det.to_dict()))  # JSON-able
    again = OpenSetDetector.from_dict(params, det.to_arrays())
    assert again.to_dict() == det.to_dict()
    np.testing.assert_array_equal(again.score(domain["ood"]), det.score(domain["ood"]))
    path = det.save(tmp_path / ARTIFACT_NAME)  # type: ignore[operator]
    loaded = OpenSetDetector.load(path)
    assert loaded.threshold == det.threshold
    np.testing.assert_array_equal(loaded.score(domain["val"]), det.score(domain["val"]))
    np.testing.assert_array_equal(loaded.is_unknown(domain["ood"]), det.is_unknown(domain["ood"]))


def test_from_dict_refuses_incomplete_or_foreign_artifacts(
    domain: dict[str, np.ndarray],
) -> None:
    det = _fitted("knn", domain)
    arrays = det.to_arrays()
    del arrays["reference"]
    with pytest.raises(OpenSetError, match="lacks reference"):
        OpenSetDetector.from_arrays(arrays)
    with pytest.raises(OpenSetError, match="schema"):
        OpenSetDetector.from_dict(det.to_dict() | {"schema_version": "99"})
    with pytest.raises(OpenSetError, match="no 'params'"):
        OpenSetDetector.from_arrays({"mean": np.zeros(3)})


def test_load_of_a_non_artifact_is_a_clear_error(tmp_path: object) -> None:
    bad = tmp_path / "bad.npz"  # type: ignore[operator]
    bad.write_bytes(b"not a zip")
    with pytest.raises(OpenSetError, match="cannot read"):
        OpenSetDetector.load(bad)


def test_score_checks_its_input(domain: dict[str, np.ndarray]) -> None:
    det = OpenSetDetector(method="knn")
    with pytest.raises(OpenSetError, match="not fitted"):
        det.score(domain["val"])
    det.fit(domain["train"], domain["labels"])
    with pytest.raises(OpenSetError, match="expects 32"):
        det.score(np.zeros((2, 5)))
    with pytest.raises(OpenSetError, match="NaN"):
        det.score(np.full((1, DIM), np.nan))
    with pytest.raises(OpenSetError, match="calibrate"):
        det.is_unknown(domain["val"])
    for method in ("knn_ratio", "logistic"):
        with pytest.raises(OpenSetError, match="needs negatives"):
            OpenSetDetector(method=method).fit(  # type: ignore[arg-type]
                domain["train"], domain["labels"]
            )
    with pytest.raises(OpenSetError, match="unknown method"):
        OpenSetDetector(method="forest")  # type: ignore[arg-type]


def test_default_is_the_benchmarked_choice(domain: dict[str, np.ndarray]) -> None:
    det = OpenSetDetector().fit(domain["train"], domain["labels"], negatives=domain["negatives"])
    assert det.to_dict()["method"] == "logistic" and det.l2 == 0.1
    # the "other" logit: negatives score above in-domain photos
    assert det.score(domain["negatives"]).min() > det.score(domain["train"]).max()


def test_knn_distance_of_a_training_point_is_zero_with_k_1(
    domain: dict[str, np.ndarray],
) -> None:
    det = OpenSetDetector(method="knn", k=1).fit(domain["train"], domain["labels"])
    np.testing.assert_allclose(det.score(domain["train"][:5]), 0.0, atol=1e-5)


# --- calibration -----------------------------------------------------------------------


@pytest.mark.parametrize("retention", [0.5, 0.9, 0.97, 1.0])
@pytest.mark.parametrize("n", [7, 60, 333])
def test_calibration_keeps_the_requested_share(
    retention: float, n: int, domain: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(n)
    det = OpenSetDetector(method="knn", k=3).fit(domain["train"], domain["labels"])
    val = domain["val"][rng.integers(0, len(domain["val"]), n)] + rng.normal(size=(n, DIM))
    threshold = det.calibrate(val, retention)
    scores = np.sort(det.score(val))
    assert (scores <= threshold).mean() >= retention
    # conformal: the ceil(retention * (n + 1))-th smallest score (the largest at most)
    rank = min(int(np.ceil(retention * (n + 1))), n)
    assert threshold == scores[rank - 1]
    assert det.calibration_size == n and det.retention == retention


def test_calibration_holds_on_new_photos_of_the_same_distribution() -> None:
    """Over many draws, the conformal threshold keeps >= retention of *new* in-domain
    scores on average; the plain quantile of the calibration photos keeps fewer."""
    rng = np.random.default_rng(3)
    kept_conformal, kept_plain = [], []
    for _ in range(400):
        cal, new = rng.normal(size=60), rng.normal(size=2000)
        kept_conformal.append((new <= threshold_for_retention(cal, 0.97)).mean())
        kept_plain.append((new <= threshold_for_retention(cal, 0.97, conformal=False)).mean())
    assert np.mean(kept_conformal) >= 0.97
    assert np.mean(kept_plain) < 0.97


def test_threshold_for_retention_by_hand() -> None:
    scores = [5.0, 1.0, 4.0, 2.0, 3.0]
    # plain quantile of the given scores
    assert threshold_for_retention(scores, 0.6, conformal=False) == 3.0  # keeps 1, 2, 3
    assert threshold_for_retention(scores, 0.61, conformal=False) == 4.0
    assert threshold_for_retention(scores, 1.0, conformal=False) == 5.0
    assert threshold_for_retention(scores, 0.01, conformal=False) == 1.0
    # conformal: rank ceil(r * 6)
    assert threshold_for_retention(scores, 0.5) == 3.0  # rank 3
    assert threshold_for_retention(scores, 0.6) == 4.0  # rank ceil(3.6) = 4
    assert threshold_for_retention(scores, 0.97) == 5.0  # rank 6 > 5: the largest
    with pytest.raises(OpenSetError, match="retention"):
        threshold_for_retention(scores, 0.0)
    with pytest.raises(OpenSetError, match="no in-domain"):
        threshold_for_retention([], 0.9)


# --- metrics ---------------------------------------------------------------------------


def test_roc_auc_by_hand() -> None:
    assert roc_auc([0, 1], [2, 3]) == 1.0
    assert roc_auc([2, 3], [0, 1]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    # pairs (neg, pos): (0,1)+ (0,3)+ (2,1)- (2,3)+ -> 3/4
    assert roc_auc([0, 2], [1, 3]) == 0.75
    # a tie counts half: (1,1)= (1,2)+ -> 0.75
    assert roc_auc([1], [1, 2]) == 0.75
    assert np.isnan(roc_auc([], [1]))


def test_ood_metrics_by_hand() -> None:
    in_scores = [0.1, 0.2, 0.3, 0.9]  # the last is wrongly unknown at 0.5
    in_correct = [True, True, False, True]
    ood_scores = [0.8, 0.4, 0.7, 0.6, 0.95]
    groups = ["objects", "objects", "daisy", "sunflowers", "roses"]
    m = ood_metrics(in_scores, ood_scores, 0.5, ood_groups=groups, in_correct=in_correct)
    assert m["ood_unknown_share"] == pytest.approx(4 / 5)
    assert m["ood_unknown_share_objects"] == pytest.approx(1 / 2)
    assert m["ood_unknown_share_daisy"] == 1.0
    assert m["ood_unknown_share_roses"] == 1.0
    assert m["ood_unknown_share_hard"] == 1.0
    assert m["in_domain_unknown_share"] == pytest.approx(1 / 4)
    assert m["answered_share"] == pytest.approx(3 / 4)
    assert m["answered_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy_all"] == pytest.approx(3 / 4)
    # pairs in-domain x ood with ood above: 0.1,0.2,0.3 beat all 5 (15), 0.9 beats 1 -> 16/20
    assert m["ood_roc_auc"] == pytest.approx(16 / 20)
    assert m["in_domain_count"] == 4 and m["ood_count"] == 5


def test_ood_metrics_checks_lengths() -> None:
    with pytest.raises(OpenSetError, match="ood_groups"):
        ood_metrics([0.1], [0.2, 0.3], 0.5, ood_groups=["a"])
    with pytest.raises(OpenSetError, match="in_correct"):
        ood_metrics([0.1], [0.2], 0.5, in_correct=[True, False])
