"""The Predictor's answer policy (dandelion_lib.serving.predict.AnswerPolicy): one place decides a
label, ``uncertain`` or ``unknown``; the model itself is exercised in tests/model. Also what
``Predictor.load`` says about a model version whose stored model file is broken, and that it
runs on the settings it is given, not on the environment's."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.labels import UNCERTAIN, UNKNOWN
from dandelion_lib.serving.predict import (
    LOW_CONFIDENCE,
    OUT_OF_DOMAIN,
    Answer,
    AnswerPolicy,
    Prediction,
)


def prediction(confidence: float, ood_score: float | None = None) -> Prediction:
    other = 1.0 - confidence
    return Prediction(
        "dandelion", {"dandelion": confidence, "grass": other}, confidence, ood_score=ood_score
    )


@pytest.mark.parametrize(
    ("confidence", "answer"),
    [(0.95, "dandelion"), (0.6, "dandelion"), (0.59, UNCERTAIN), (0.5, UNCERTAIN)],
)
def test_threshold_decides_uncertain(confidence: float, answer: str) -> None:
    assert AnswerPolicy(threshold=0.6).decide(prediction(confidence)).label == answer


def test_policy_comes_from_settings() -> None:
    assert AnswerPolicy() == AnswerPolicy.from_settings(Settings())
    strict = AnswerPolicy.from_settings(Settings(confidence_threshold=0.99))
    assert strict.decide(prediction(0.95)).label == UNCERTAIN
    # No detector threshold (a model without a detector): the score changes nothing.
    assert strict.decide(prediction(0.995, ood_score=1e9)).label == "dandelion"


@pytest.mark.parametrize(
    ("confidence", "ood_score", "expected"),
    [
        (0.99, 0.5, Answer("dandelion")),
        (0.99, 2.0, Answer("dandelion")),  # the threshold itself is still in-domain
        (0.99, 2.0001, Answer(UNKNOWN, OUT_OF_DOMAIN)),  # confident but out of domain
        (0.55, 5.0, Answer(UNKNOWN, OUT_OF_DOMAIN)),  # unknown wins over uncertain
        (0.55, 0.0, Answer(UNCERTAIN, LOW_CONFIDENCE)),
        (0.55, None, Answer(UNCERTAIN, LOW_CONFIDENCE)),  # no score: never unknown
        (0.99, None, Answer("dandelion")),
        (float("nan"), 0.0, Answer(UNCERTAIN, LOW_CONFIDENCE)),
    ],
)
def test_unknown_then_uncertain_then_label(
    confidence: float, ood_score: float | None, expected: Answer
) -> None:
    policy = AnswerPolicy(threshold=0.6, ood_threshold=2.0)
    assert policy.decide(prediction(confidence, ood_score)) == expected


def test_predictor_takes_its_detectors_threshold() -> None:
    import numpy as np

    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.serving.predict import Predictor
    from dandelion_lib.training.openset import OpenSetDetector

    rng = np.random.default_rng(0)
    det = OpenSetDetector(method="mahalanobis").fit(rng.normal(size=(40, 4)), np.repeat([0, 1], 20))
    det.calibrate(rng.normal(size=(20, 4)), 0.9)
    p = Predictor(model=None, spec=FeatureSpec(), detector=det, policy=AnswerPolicy(0.7))
    assert p.policy.ood_threshold == det.threshold and p.policy.threshold == 0.7
    # an explicit policy threshold is kept
    fixed = AnswerPolicy(0.7, ood_threshold=1.5)
    assert Predictor(model=None, spec=FeatureSpec(), detector=det, policy=fixed).policy == fixed


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLflow Keras model folder (a tiny model; no registry needed)."""
    import keras
    import mlflow

    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    path = tmp_path_factory.mktemp("saved") / "model"
    mlflow.keras.save_model(model, str(path), pip_requirements=["keras"])
    return path


def _broken_copy(src: Path, dst: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    (keras_file,) = dst.rglob("model.keras")
    damage(keras_file)
    return dst


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [_truncate, lambda p: p.write_bytes(b"this is not a keras archive")],
    ids=["truncated", "garbage"],
)
def test_a_corrupt_model_file_is_reported_as_corrupt(
    saved_model_dir: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    from dandelion_lib.serving.loading import ModelUnavailableError
    from dandelion_lib.serving.predict import Predictor

    assert Predictor.load(str(saved_model_dir), Settings()).labels  # the intact copy loads
    broken = _broken_copy(saved_model_dir, tmp_path / "broken", damage)
    with pytest.raises(ModelUnavailableError) as info:
        Predictor.load(str(broken), Settings())
    first = str(info.value).splitlines()[0]
    assert re.search(r"model\.keras is corrupt", first), first
    assert "not found" not in first.lower()


def test_a_missing_model_file_is_reported_as_missing(saved_model_dir: Path, tmp_path: Path) -> None:
    from dandelion_lib.serving.loading import ModelUnavailableError
    from dandelion_lib.serving.predict import Predictor

    broken = _broken_copy(saved_model_dir, tmp_path / "broken", Path.unlink)
    with pytest.raises(ModelUnavailableError, match="missing"):
        Predictor.load(str(broken), Settings())


def _with_onnx_runtime(src: Path, dst: Path) -> Path:
    """A copy of the saved model with a ``runtime/`` folder whose FP32 ONNX graph is the same
    computation (mean colour -> linear -> softmax), written with the ``onnx`` helpers."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dandelion_lib.serving import runtime

    shutil.copytree(src, dst)
    weights = numpy_helper.from_array(np.asarray([[1, -1], [0, 0], [-1, 1]], np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, None, None, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 2])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", runtime.OPSET)])
    folder = dst / runtime.DIR
    folder.mkdir()
    onnx.save(model, str(folder / runtime.FILES["fp32"]))
    record = runtime.RuntimeRecord(features=False, files={"fp32": runtime.FILES["fp32"]})
    (folder / runtime.RECORD).write_text(json.dumps(record.to_dict()))
    return dst


def test_load_runs_on_the_settings_it_is_given(
    saved_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runtime, thread count and ONNX batch size come from the ``Settings`` passed to
    ``Predictor.load`` (as the API passes its own), even where the environment says otherwise."""
    from dandelion_lib.core.config import get_settings
    from dandelion_lib.serving.predict import Predictor
    from dandelion_lib.serving.runtime import OnnxForward

    folder = _with_onnx_runtime(saved_model_dir, tmp_path / "with-runtime")
    monkeypatch.setenv("DANDELION_SERVING_RUNTIME", "keras")
    monkeypatch.setenv("DANDELION_INFERENCE_THREADS", "3")
    monkeypatch.setenv("DANDELION_INFERENCE_BATCH_MAX", "7")
    get_settings.cache_clear()
    try:
        assert get_settings().serving.serving_runtime == "keras"  # what the environment says
        given = Settings(serving_runtime="onnx", inference_threads=2, inference_batch_max=4)
        predictor = Predictor.load(str(folder), given)
    finally:
        get_settings.cache_clear()
    assert (predictor.runtime, predictor.precision, predictor.runtime_note) == (
        "onnx",
        "fp32",
        None,
    )
    forward = predictor._forward
    assert isinstance(forward, OnnxForward)
    assert forward.max_batch == 4
    assert forward.session.get_session_options().intra_op_num_threads == 2
    # the settings' runtime decides: keras loads the Keras model, whatever the environment
    monkeypatch.setenv("DANDELION_SERVING_RUNTIME", "onnx")
    keras = Predictor.load(str(folder), Settings(serving_runtime="keras"))
    assert keras.runtime == "keras" and keras._forward is not None and keras.model is not None


def test_a_blank_image_is_unknown_whatever_the_model_says() -> None:
    """An all-black frame was answered `grass` at 91 %: a flat image has nothing to classify."""
    import io

    import numpy as np
    from PIL import Image

    from dandelion_lib.core.features import bytes_to_model_input
    from dandelion_lib.serving.predict import BLANK_IMAGE, Prediction, blank_inputs

    def model_input(img: Image.Image) -> np.ndarray:
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        return bytes_to_model_input(buf.getvalue())

    black = model_input(Image.new("RGB", (640, 480)))
    green = model_input(Image.new("RGB", (640, 480), (40, 120, 30)))
    rng = np.random.default_rng(0)
    dark = model_input(Image.fromarray(rng.integers(0, 24, (480, 640, 3), dtype=np.uint8)))
    assert blank_inputs(np.stack([black, green, dark])) == [True, True, False]
    assert blank_inputs(np.stack([black, green, dark])[:0]) == []
    confident = Prediction("grass", {"dandelion": 0.09, "grass": 0.91}, 0.91, blank=True)
    assert AnswerPolicy().decide(confident) == Answer(UNKNOWN, BLANK_IMAGE)
    assert AnswerPolicy().decide(replace(confident, blank=False)) == Answer("grass")


def test_blank_inputs_decides_as_the_whole_image_measured_in_float64() -> None:
    """The sampled rows only shortcut the photos that clearly vary: every case is decided as
    the standard deviation of all pixels (float64) decides it, including images whose sampled
    rows are flat and whose other rows are not, and deviations just either side of the limit."""
    import numpy as np

    from dandelion_lib.serving.predict import BLANK_SAMPLE_STEP, BLANK_STD, blank_inputs

    rng = np.random.default_rng(3)
    size = 8 * BLANK_SAMPLE_STEP
    images = []
    for sigma in (0.0, 1.0, 1.9, 2.1, 6.0, 40.0):
        images.append(120 + rng.normal(0, sigma, (size, size, 3)))
    one_hot_pixel = np.full((size, size, 3), 200.0)
    one_hot_pixel[5, 7, 1] = 150
    images.append(one_hot_pixel)
    unsampled_rows_vary = np.full((size, size, 3), 80.0)
    unsampled_rows_vary[1::BLANK_SAMPLE_STEP] = rng.uniform(0, 255, (8, size, 3))
    images.append(unsampled_rows_vary)
    sampled_rows_vary = np.full((size, size, 3), 80.0)
    sampled_rows_vary[::BLANK_SAMPLE_STEP, :, 2] = rng.uniform(0, 255, (8, size))
    images.append(sampled_rows_vary)
    batch = np.clip(np.stack(images), 0, 255).astype(np.float32)

    whole = batch.astype(np.float64).reshape(len(batch), -1, 3).std(axis=1).max(axis=1)
    assert blank_inputs(batch) == [bool(s < BLANK_STD) for s in whole]
    assert blank_inputs(batch) == [True, True, True, False, False, False, True, False, False]
