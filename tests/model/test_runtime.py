"""The served runtime (ONNX Runtime, FP32 and INT8) against the Keras model it was converted
from, on the reference photos; the fallback when an artifact is missing or corrupt; the parity
rule that stops registration. Real models, real MLflow (SQLite), real photos."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.lifecycle.evaluate import evaluate_split
from dandelion_lib.lifecycle.metrics import EvaluationReport
from dandelion_lib.serving import runtime
from dandelion_lib.serving.loading import ModelUnavailableError
from dandelion_lib.serving.predict import Predictor
from tests.model.conftest import STAND_IN


def _pixels(model_env: Any, frame: Any, spec: Any) -> np.ndarray:
    from dandelion_lib.core.features import to_model_input
    from dandelion_lib.core.images import decode_image

    rows = [
        to_model_input(decode_image(model_env.store.get_bytes(key)), spec) for key in frame["key"]
    ]
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def keras_predictor(model_env: Any, trained: Any) -> Predictor:
    from dandelion_lib.lifecycle.registry import configure_mlflow

    configure_mlflow(model_env.settings)
    return Predictor.load(trained.model_uri, model_env.settings, runtime="keras")


@pytest.fixture(scope="module")
def photos(model_env: Any, test_split: Any, keras_predictor: Predictor) -> np.ndarray:
    return _pixels(model_env, test_split, keras_predictor.spec)


@pytest.fixture(scope="module")
def local_copy(tmp_path_factory: pytest.TempPathFactory, trained: Any, model_env: Any) -> Path:
    """The registered version's files, downloaded once (copies of it get damaged below)."""
    import mlflow

    from dandelion_lib.lifecycle.registry import configure_mlflow

    configure_mlflow(model_env.settings)
    dst = tmp_path_factory.mktemp("model-copy")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=trained.model_uri, dst_path=dst))


@pytest.fixture(scope="module")
def lite0_copy(
    tmp_path_factory: pytest.TempPathFactory, lite0_trained: Any, model_env: Any
) -> Path:
    """The real backbone's registered version's files (its runtime's size is the real one's)."""
    import mlflow

    from dandelion_lib.lifecycle.registry import configure_mlflow

    configure_mlflow(model_env.settings)
    dst = tmp_path_factory.mktemp("lite0-copy")
    uri = lite0_trained.model_uri
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))


def _probs(predictor: Predictor, pixels: np.ndarray) -> np.ndarray:
    preds = predictor.predict_arrays(pixels)
    return np.array([[p.probabilities[lab] for lab in predictor.labels] for p in preds])


def test_registration_records_the_runtime_and_its_parity(lite0_copy: Path, model_env: Any) -> None:
    """On the real backbone's tiny model: its files' sizes are the real ones."""
    record = json.loads((lite0_copy / runtime.DIR / runtime.RECORD).read_text())
    assert record["format"] == "onnx" and record["features"] is True
    assert set(record["files"]) == {"fp32", "int8"}
    # the first int8_calibration_images of the tiny model's 80 training photos (tests: 32)
    assert record["calibration_images"] == min(
        model_env.settings.promotion.int8_calibration_images, 80
    )
    fp32 = record["parity"]["fp32"]
    assert fp32["n"] == 60 and fp32["max_abs_diff"] <= runtime.FP32_PARITY_TOLERANCE
    assert fp32["label_flips"] == 0
    assert record["parity"]["int8"]["n"] == 60
    for precision, name in record["files"].items():
        size = (lite0_copy / runtime.DIR / name).stat().st_size
        assert size > 1_000_000, (precision, size)
    # INT8 weights take about a quarter of the room
    files = {p: (lite0_copy / runtime.DIR / n).stat().st_size for p, n in record["files"].items()}
    assert files["int8"] < files["fp32"] / 2


def test_fp32_runtime_reproduces_keras_on_held_out_photos(
    model_env: Any, trained: Any, keras_predictor: Predictor, photos: np.ndarray
) -> None:
    onnx = Predictor.load(trained.model_uri, model_env.settings, runtime="onnx", precision="fp32")
    assert (onnx.runtime, onnx.precision, onnx.model) == ("onnx", "fp32", None)
    assert keras_predictor.runtime == "keras" and keras_predictor.model is not None
    reference, got = _probs(keras_predictor, photos), _probs(onnx, photos)
    assert len(photos) == 60
    assert np.abs(reference - got).max() <= runtime.FP32_PARITY_TOLERANCE
    assert (reference.argmax(1) == got.argmax(1)).all()
    # the backbone's features too: the open-set detector scores them
    feats_keras, feats_onnx = keras_predictor.features(photos), onnx.features(photos)
    assert np.allclose(feats_keras, feats_onnx, atol=1e-3, rtol=1e-3)
    scores = [p.ood_score for p in onnx.predict_arrays(photos[:8])]
    expected = [p.ood_score for p in keras_predictor.predict_arrays(photos[:8])]
    assert np.allclose(np.array(scores, float), np.array(expected, float), rtol=1e-3, atol=1e-3)


class _CountingSession:
    """The real ONNX Runtime session, recording the batch size of each call."""

    def __init__(self, session: Any) -> None:
        self.session, self.sizes = session, []

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.sizes.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def test_a_batch_larger_than_the_session_batch_runs_in_chunks_with_the_same_answers(
    local_copy: Path, photos: np.ndarray
) -> None:
    # inference_batch_max bounds ONNX Runtime's memory arena; chunking must not change a figure
    whole, _ = runtime.load(local_copy, "fp32", threads=1, max_batch=64)
    chunked, _ = runtime.load(local_copy, "fp32", threads=1, max_batch=4)
    counting = chunked.session = _CountingSession(chunked.session)
    feats, probs = whole(photos[:13])
    feats_c, probs_c = chunked(photos[:13])
    assert counting.sizes == [4, 4, 4, 1]
    assert probs_c.shape == probs.shape == (13, 2)
    assert np.allclose(probs_c, probs, atol=1e-6)
    assert feats is not None and feats_c is not None and np.allclose(feats_c, feats, atol=1e-5)


def test_int8_runtime_stays_close_to_the_model_it_came_from(
    model_env: Any, trained: Any, local_copy: Path, keras_predictor: Predictor, photos: np.ndarray
) -> None:
    # the INT8 session alone (no FP32 recheck near the boundaries)
    alone = model_env.settings.updated(int8_recheck_margin=0.0, int8_recheck_confidence_margin=0.0)
    int8 = Predictor.load(trained.model_uri, alone, runtime="onnx", precision="int8")
    assert (int8.runtime, int8.precision, int8.recheck) == ("onnx", "int8", None)
    record = json.loads((local_copy / runtime.DIR / runtime.RECORD).read_text())
    val = record["parity"]["int8"]
    reference, got = _probs(keras_predictor, photos), _probs(int8, photos)
    diff = np.abs(reference - got)
    # its probabilities are still a distribution (the softmax is not quantized)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # Quantization moves probabilities (it is not FP32: the record says by how much on the
    # validation photos) but keeps most answers: whether that is close enough to serve is the
    # gate's decision, on the test split's accuracy and ROC AUC (tests/model/test_promote.py).
    assert diff.max() > runtime.FP32_PARITY_TOLERANCE
    assert 0 < val["max_abs_diff"] < 1 and val["label_flips"] <= 0.1 * val["n"]
    assert diff.mean() <= 0.1
    assert (reference.argmax(1) != got.argmax(1)).mean() <= 0.1


def test_int8_answers_photos_near_a_boundary_with_fp32(
    model_env: Any, trained: Any, photos: np.ndarray
) -> None:
    """INT8 served: the photos INT8 puts near the open-set threshold or the confidence
    threshold get FP32's outputs (the same model version's FP32 session), the others INT8's."""
    settings = model_env.settings
    uri = trained.model_uri
    fp32 = Predictor.load(uri, settings, runtime="onnx", precision="fp32")
    off = settings.updated(int8_recheck_margin=0.0, int8_recheck_confidence_margin=0.0)
    alone = Predictor.load(uri, off, runtime="onnx", precision="int8")
    served = Predictor.load(uri, settings, runtime="onnx", precision="int8")
    assert fp32.recheck is None and alone.recheck is None and served.recheck is not None
    a, b, c = (p.predict_arrays(photos) for p in (fp32, alone, served))
    recheck, policy = served.recheck, served.policy
    near = [
        abs(x.confidence - policy.threshold) < recheck.confidence_margin
        or (
            x.ood_score is not None
            and policy.ood_threshold is not None
            and abs(x.ood_score - policy.ood_threshold) < recheck.ood_margin
        )
        for x in b
    ]
    assert any(near) and not all(near), "the photos should be on both sides of the margins"
    for f, i, got, is_near in zip(a, b, c, near, strict=True):
        expected = f if is_near else i
        assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
        assert got.ood_score == pytest.approx(expected.ood_score, abs=1e-5)
    before = recheck.rechecked
    # margins that take in every photo: every answer is FP32's
    wide = settings.updated(int8_recheck_margin=1e9, int8_recheck_confidence_margin=1.0)
    everything = Predictor.load(uri, wide, runtime="onnx", precision="int8")
    assert _probs(everything, photos) == pytest.approx(_probs(fp32, photos), abs=1e-6)
    assert before >= sum(near)


def test_evaluation_runs_the_runtime_it_is_given(
    model_env: Any, trained: Any, keras_predictor: Predictor
) -> None:
    onnx = Predictor.load(trained.model_uri, model_env.settings, runtime="onnx", precision="fp32")
    a: EvaluationReport = evaluate_split(onnx, model_env.store, model_env.version)
    b: EvaluationReport = evaluate_split(keras_predictor, model_env.store, model_env.version)
    assert a.metrics["n"] == b.metrics["n"] > 0
    assert a.accuracy == b.accuracy
    assert abs(a.metrics["roc_auc"] - b.metrics["roc_auc"]) < 1e-6


def _damaged(local_copy: Path, tmp_path: Path, damage: str) -> Path:
    target = tmp_path / "model"
    shutil.copytree(local_copy, target)
    folder = target / runtime.DIR
    if damage == "no-int8":
        (folder / runtime.FILES["int8"]).unlink()
    elif damage == "corrupt":
        for name in runtime.FILES.values():
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 3])
    elif damage == "garbage-with-record":  # same bytes as recorded, but not what ORT reads
        path = folder / runtime.FILES["fp32"]
        path.write_bytes(b"not an onnx model")
        record = json.loads((folder / runtime.RECORD).read_text())
        record["sha256"] = {}
        (folder / runtime.RECORD).write_text(json.dumps(record))
        (folder / runtime.FILES["int8"]).unlink()
    elif damage == "no-runtime":
        shutil.rmtree(folder)
    return target


def test_missing_int8_falls_back_to_fp32_onnx(
    local_copy: Path, tmp_path: Path, photos: np.ndarray, keras_predictor: Predictor
) -> None:
    p = Predictor.load(str(_damaged(local_copy, tmp_path, "no-int8")), Settings(), precision="int8")
    assert (p.runtime, p.precision) == ("onnx", "fp32")
    assert p.runtime_note and "runtime/model.int8.onnx is missing" in p.runtime_note
    assert np.abs(_probs(p, photos[:4]) - _probs(keras_predictor, photos[:4])).max() <= 1e-4


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("corrupt", "is corrupt (its sha256 differs from the record"),
        ("garbage-with-record", "cannot be loaded"),
        ("no-runtime", "has no runtime artifact"),
    ],
)
def test_unusable_artifacts_fall_back_to_keras_and_say_why(
    local_copy: Path,
    tmp_path: Path,
    photos: np.ndarray,
    keras_predictor: Predictor,
    damage: str,
    says: str,
) -> None:
    folder = _damaged(local_copy, tmp_path, damage)
    p = Predictor.load(str(folder), Settings(), precision="int8")
    assert (p.runtime, p.precision) == ("keras", "fp32") and p.model is not None
    assert p.runtime_note and says in p.runtime_note
    assert np.abs(_probs(p, photos[:4]) - _probs(keras_predictor, photos[:4])).max() == 0
    # asked for ONNX by name, the same artifact is an error, not a silent fallback
    with pytest.raises(ModelUnavailableError, match=f"cannot load model .*{re.escape(says)}"):
        Predictor.load(str(folder), Settings(), runtime="onnx")


def test_registration_stops_when_fp32_does_not_reproduce_keras(
    trained: Any, photos: np.ndarray, tmp_path: Path
) -> None:
    size = photos.shape[1]
    honest = runtime.keras_forward(trained.model, size)

    def off_by_a_little(x: np.ndarray) -> tuple[Any, Any]:
        features, probs = honest(x)
        return features, np.clip(probs + 1e-3, 0, 1)

    out = tmp_path / "runtime"
    with pytest.raises(runtime.RuntimeParityError, match=r"differs from the Keras model by 1\.0"):
        runtime.build(
            trained.model,
            size,
            out,
            keras_forward=off_by_a_little,
            parity_pixels=photos[:8],
            calibration_pixels=None,
            max_batch=8,
        )
    assert not out.exists()  # nothing half-written is left behind


def test_training_extracts_features_on_onnx_where_exact(
    lite0_trained: Any, mlflow_client: Any, photos: np.ndarray, tmp_path: Path
) -> None:
    """The real backbone's training run extracted on ONNX Runtime; the rule itself (convert
    on first use, keep TensorFlow where ONNX Runtime differs) on the test stand-in."""
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.core.storage import LocalStore
    from dandelion_lib.lifecycle.extractor import FeatureExtractor, feature_extractor
    from dandelion_lib.training import model as model_lib
    from dandelion_lib.training.extraction import open_feature_store

    # the real backbone's tiny model was trained so: the run says which runtime extracted
    run = mlflow_client.get_run(lite0_trained.run_id)
    assert run.data.tags["extraction_runtime"] == "onnx"
    assert run.data.metrics["extraction_onnx_max_abs_diff"] <= runtime.FP32_PARITY_TOLERANCE

    backbone = model_lib.build_backbone(STAND_IN, "imagenet", photos.shape[1])
    fast = feature_extractor(backbone, Settings())
    assert fast.runtime == "keras" and fast.parity is None  # nothing converted before use
    got = fast(photos[:8])
    assert fast.runtime == "onnx" and fast.parity is not None
    reference = np.asarray(fast.graph(photos[:8]))
    assert got.shape == reference.shape == (8, backbone.feature_dim)
    assert np.abs(got - reference).max() <= runtime.FP32_PARITY_TOLERANCE
    later = fast(photos[8:16])  # later batches: ONNX Runtime, same features
    assert np.abs(later - np.asarray(fast.graph(photos[8:16]))).max() <= 1e-4

    slow = feature_extractor(backbone, Settings(extraction_runtime="keras"))
    assert np.array_equal(slow(photos[:8]), reference) and slow.runtime == "keras"

    # where ONNX Runtime does not reproduce TensorFlow, TensorFlow stays, it says why, and
    # the feature store it was given holds no converted graph
    store = LocalStore(tmp_path / "store")
    cache = open_feature_store(store, FeatureSpec(image_size=photos.shape[1]), backbone)
    drifting = FeatureExtractor(backbone, max_batch=8, cache=cache)
    graph = drifting.graph
    drifting.graph = lambda x: np.asarray(graph(x)) + 1e-3  # a TensorFlow that disagrees
    drifting(photos[:8])
    assert drifting.runtime == "keras" and drifting.note and "differ by 1.0e-03" in drifting.note
    assert not list(store.list("features/"))


def test_the_converted_backbone_is_stored_once_and_read_by_every_later_extractor(
    tmp_path: Path, photos: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first extractor of a backbone converts it and stores the graph in the feature
    store; a later one (another task, another training) reads it and converts nothing; a
    stored graph that is not what its record names is converted again (a graph that does
    not reproduce TensorFlow is never stored: the test above). On the test stand-in
    backbone; the store is a real local one."""
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.core.storage import LocalStore
    from dandelion_lib.lifecycle.extractor import converted_variant, feature_extractor
    from dandelion_lib.training import model as model_lib
    from dandelion_lib.training.extraction import open_feature_store

    backbone = model_lib.build_backbone(STAND_IN, "imagenet", photos.shape[1])
    store = LocalStore(tmp_path / "store")
    fstore = open_feature_store(store, FeatureSpec(image_size=photos.shape[1]), backbone)
    variant = converted_variant()
    assert re.fullmatch(r"[0-9a-f]{32}", variant) and converted_variant() == variant
    stored = f"features/{fstore.key}/converted/{variant}"

    first = feature_extractor(backbone, Settings(), cache=fstore)
    features = first(photos[:8])
    assert (first.runtime, first.cached) == ("onnx", False) and first.parity is not None
    assert (
        store.exists(f"{stored}.bin") and store.get_json(f"{stored}.json")["parity"] == first.parity
    )

    exports: list[Path] = []
    export = runtime.export_fp32
    monkeypatch.setattr(runtime, "export_fp32", lambda *a: exports.append(a[2]) or export(*a))
    later = feature_extractor(backbone, Settings(), cache=fstore)
    np.testing.assert_array_equal(later(photos[:8]), features)  # the same graph
    assert (later.runtime, later.cached, later.parity, exports) == ("onnx", True, first.parity, [])

    store.put_bytes(f"{stored}.bin", b"not the graph its record names")
    again = feature_extractor(backbone, Settings(), cache=fstore)
    np.testing.assert_allclose(again(photos[:8]), features, atol=runtime.FP32_PARITY_TOLERANCE)
    assert (again.runtime, again.cached, len(exports)) == ("onnx", False, 1)
    assert fstore.get_converted(variant) is not None  # stored anew, whole
    assert feature_extractor(backbone, Settings(), cache=fstore)(photos[:2]).shape[0] == 2
    assert len(exports) == 1
