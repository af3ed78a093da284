"""Explanations from the served runtime (FP32 and INT8 ONNX) of the shared tiny model on the
stand-in backbone: the answers do not change when an explanation is asked for, the grid is
the backbone's map grid in [0, 1] and explains the top class, the gradient the explainer
computes is the Keras head's, and a version registered without feature maps still serves
and says why it cannot explain. Slow: the deletion test on the default recipe's model.
Real model, real MLflow (SQLite), real photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.serving import explain, runtime
from dandelion_lib.serving.predict import Predictor
from tests.model.test_runtime import _pixels

HOLDS_FLOOR = 0.6
"""Share of the test split's 60 photos on which the hot cells must lower the probability more
than a random region, both masked in black (measured: 0.77 on the default recipe's model; 0.73
with the photo's mean colour; the benchmark's target over every held-out photo is 0.8,
docs/model.md)."""
DROP_RATIO = 1.5
"""The hot cells' mean probability drop over the random regions' (measured: 0.137 against
0.024, 5.8x)."""


@pytest.fixture(scope="module")
def photos(model_env: Any, test_split: Any, predictor: Predictor) -> np.ndarray:
    return _pixels(model_env, test_split.iloc[::6], predictor.spec)


@pytest.fixture(scope="module")
def local_copy(tmp_path_factory: pytest.TempPathFactory, trained: Any, model_env: Any) -> Path:
    import mlflow

    from dandelion_lib.lifecycle.registry import configure_mlflow

    configure_mlflow(model_env.settings)
    dst = tmp_path_factory.mktemp("explain-copy")
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=trained.model_uri, dst_path=str(dst))
    )


def _probs(preds: list[Any], labels: tuple[str, ...]) -> np.ndarray:
    return np.array([[p.probabilities[lab] for lab in labels] for p in preds])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_explanations_leave_the_answers_alone(
    local_copy: Path, photos: np.ndarray, precision: str
) -> None:
    p = Predictor.load(str(local_copy), Settings(), runtime="onnx", precision=precision)
    assert p.explainer is not None and p.explain_unavailable is None
    plain = p.predict_arrays(photos)
    explained = p.predict_arrays(photos, explain=True)
    assert np.array_equal(_probs(plain, p.labels), _probs(explained, p.labels))
    assert [x.ood_score for x in plain] == [x.ood_score for x in explained]
    assert all(x.explanation is None for x in plain)
    for pred in explained:
        assert pred.explanation is not None
        grid = pred.explanation.grid
        # the stand-in's 16 px blocks: a 22 x 22 grid at 352 px
        assert grid.shape == (photos.shape[1] // 16,) * 2
        assert grid.min() >= 0.0 and grid.max() <= 1.0
        assert pred.explanation.explains == pred.label  # the top class, whatever the answer
    assert sum(x.explanation.grid.max() == pytest.approx(1.0) for x in explained) >= 1  # type: ignore[union-attr]
    # asked per image: only those asked for carry one
    mixed = p.predict_arrays(photos[:3], explain=[True, False, True])
    assert [m.explanation is not None for m in mixed] == [True, False, True]


def test_the_runtime_record_and_the_gradient_are_the_heads(
    local_copy: Path, trained: Any, photos: np.ndarray
) -> None:
    record = json.loads((local_copy / runtime.DIR / runtime.RECORD).read_text())
    # the stand-in pools one map twice (average and maximum): one map output
    assert record["explain"]["file"] == explain.ARTIFACT and record["explain"]["maps"] == 1
    explainer = runtime.load_explainer(local_copy, runtime.RuntimeRecord.from_dict(record))
    assert explainer.segments == ((0, "avg"), (0, "max"))
    parts = runtime.split_model(trained.model)
    assert parts is not None
    backbone, head = parts
    features = np.asarray(backbone(photos[:2], training=False))
    eps = 1e-3
    for target in (0, 1):
        grad = explainer.gradient(features[0], target)

        def log_odds(x: np.ndarray, t: int = target) -> float:
            probs = np.asarray(head(x[None], training=False), dtype=np.float64)[0]
            return float(np.log(probs[t]) - np.log(probs[1 - t]))

        rows = np.argsort(-np.abs(grad))[:4]  # the features that weigh most
        for k in rows:
            step = np.zeros_like(features[0])
            step[k] = eps
            numeric = (log_odds(features[0] + step) - log_odds(features[0] - step)) / (2 * eps)
            assert numeric == pytest.approx(grad[k], rel=2e-2, abs=1e-3)


def test_a_version_registered_without_feature_maps_serves_and_says_why(
    local_copy: Path, tmp_path: Path, photos: np.ndarray
) -> None:
    old = tmp_path / "model"
    shutil.copytree(local_copy, old)
    folder = old / runtime.DIR
    record = json.loads((folder / runtime.RECORD).read_text())
    del record["explain"]  # as recorded before explanations existed
    (folder / runtime.RECORD).write_text(json.dumps(record))
    (folder / explain.ARTIFACT).unlink()
    p = Predictor.load(str(old), Settings(), runtime="onnx", precision="fp32")
    fresh = Predictor.load(str(local_copy), Settings(), runtime="onnx", precision="fp32")
    assert (p.runtime, p.explainer) == ("onnx", None)
    assert np.array_equal(
        _probs(p.predict_arrays(photos), p.labels), _probs(fresh.predict_arrays(photos), p.labels)
    )
    assert p.explain_unavailable and "registered without the feature maps" in p.explain_unavailable
    with pytest.raises(explain.ExplanationUnavailableError, match="cannot explain its answers"):
        p.predict_arrays(photos[:1], explain=True)
    # the Keras fallback cannot explain either, and says so
    k = Predictor.load(str(local_copy), Settings(), runtime="keras")
    with pytest.raises(explain.ExplanationUnavailableError, match="ONNX runtime"):
        k.predict_arrays(photos[:1], explain=True)


@pytest.mark.slow  # the default recipe's training (shared); 60 real photos, 5 passes each
def test_masking_where_the_real_model_looked_lowers_its_answer_more_than_random(
    model_env: Any, test_split: Any, default_predictor: Predictor
) -> None:
    """On the default recipe's model (``default_predictor``, shared with the open-set
    behaviour tests), the test split's 60 held-out photos: masking the hottest 20 % of the map
    lowers the explained class's probability more than masking a random region of as many
    cells, on most photos and on average by a wide margin (the figures on every held-out photo
    of both sources are ``bench -- explain``'s, docs/model.md)."""
    served = default_predictor
    pixels = _pixels(model_env, test_split, served.spec)
    explainer = served.explainer
    assert explainer is not None

    def log_probabilities(batch: np.ndarray) -> np.ndarray:
        return explain.log_softmax(explainer.logits(served.features(batch)))

    rng = np.random.default_rng(0)
    results = []
    for x in pixels:
        (pred,) = served.predict_arrays(x[None], explain=True)
        assert pred.explanation is not None and pred.explanation.grid.shape == (11, 11)
        target = list(served.labels).index(pred.explanation.explains)
        results.append(explain.deletion_test(log_probabilities, x, pred.explanation, target, rng))
    holds = float(np.mean([r.holds for r in results]))
    hot = float(np.mean([np.exp(r.before) - np.exp(r.top) for r in results]))
    random = float(np.mean([np.exp(r.before) - np.exp(r.random) for r in results]))
    assert len(results) == len(test_split) == 60
    assert holds >= HOLDS_FLOOR, [(r.before, r.top, r.random) for r in results]
    assert hot >= DROP_RATIO * random
