"""The served runtime: every model version's Keras model converted to ONNX Runtime.

At registration the model is exported as ``x -> (features, probabilities)`` (the same pair
the Predictor computes) to ONNX in FP32, and quantized to INT8 (static, QDQ, per-channel
weights, activations calibrated on training images). Both files and a parity record live in
the MLflow model version's ``runtime/`` folder, beside the Keras model:

* ``runtime/model.onnx`` — FP32; it must match the Keras model within
  :data:`FP32_PARITY_TOLERANCE` (largest absolute probability difference) on the validation
  split, else registration fails (:class:`RuntimeParityError`);
* ``runtime/model.int8.onnx`` — INT8; its difference from Keras is recorded, not enforced
  here: the promotion gate decides whether it is served (:mod:`dandelion_lib.lifecycle.gate`);
* ``runtime/runtime.json`` — :class:`RuntimeRecord`: format, opset, outputs, each file's
  sha256 and its parity figures (also in the MLmodel metadata as ``runtime``);
* ``runtime/explain.npz`` — the head's weights for explanations
  (:mod:`dandelion_lib.serving.explain`), when the backbone pools its features from feature
  maps the graph can return: both graphs then also output those maps, after the features and
  the probabilities. They are fetched only when an explanation is asked for
  (:meth:`OnnxForward.with_maps`); a version registered without them serves as before and
  cannot explain its answers.

Why ONNX Runtime: on the served architecture it is 2.2-2.4x faster than TensorFlow at
batch 1, loads in under a second and keeps ~100 MB resident instead of ~800 MB; OpenVINO
and LiteRT measured alike, ONNX Runtime is the smallest dependency with a portable format.
Keras' own ONNX export loses the head's fitted standardisation (it becomes a graph input),
so the graph is frozen first and converted with ``tf2onnx``.

Loading needs only ``onnxruntime`` and numpy: TensorFlow is imported by the export alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.storage import sha256_hex
from dandelion_lib.serving import explain as explain_lib

FORMAT = "onnx"
DIR = "runtime"
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
RECORD = "runtime.json"
OPSET = 17
FP32_PARITY_TOLERANCE = 1e-4
"""Largest absolute probability difference FP32 ONNX may show against Keras."""
PRECISIONS = ("fp32", "int8")

Forward = Callable[[npt.NDArray[np.float32]], tuple[Any, Any]]
"""``pixels (N, size, size, 3) -> (features (N, D) or None, probabilities (N, C))``."""


class RuntimeArtifactError(DandelionError):
    """A runtime artifact is missing, corrupt or cannot be loaded (one user-facing line)."""


class RuntimeParityError(DandelionError):
    """The FP32 runtime does not reproduce the Keras model: registration stops."""


@dataclass(frozen=True)
class Parity:
    """How far a runtime's probabilities are from Keras' on ``n`` images."""

    n: int
    max_abs_diff: float
    label_flips: int

    @classmethod
    def between(cls, reference: Any, probs: Any) -> Parity:
        ref = np.asarray(reference, dtype=np.float64)
        got = np.asarray(probs, dtype=np.float64)
        if ref.shape != got.shape:
            raise RuntimeParityError(f"the runtime answers shape {got.shape}, Keras {ref.shape}")
        diff = float(np.abs(ref - got).max()) if ref.size else 0.0
        flips = int((ref.argmax(axis=1) != got.argmax(axis=1)).sum()) if ref.size else 0
        return cls(n=len(ref), max_abs_diff=diff, label_flips=flips)


@dataclass(frozen=True)
class RuntimeRecord:
    """``runtime/runtime.json``: what was converted and how close it is to Keras."""

    format: str = FORMAT
    opset: int = OPSET
    features: bool = True
    """Whether the graph also returns the backbone's features (for the open-set detector)."""
    files: dict[str, str] = field(default_factory=dict)
    """precision -> file name inside ``runtime/``."""
    sha256: dict[str, str] = field(default_factory=dict)
    parity: dict[str, dict[str, float | int]] = field(default_factory=dict)
    """precision -> :class:`Parity` against Keras on the validation split."""
    tolerance: float = FP32_PARITY_TOLERANCE
    calibration_images: int = 0
    explain: dict[str, Any] = field(default_factory=dict)
    """Empty, or ``file`` (the head for explanations), its ``sha256`` and ``maps`` (how many
    feature maps each graph outputs after the probabilities)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def split_model(model: Any) -> tuple[Any, Any] | None:
    """``(backbone, head)`` of a model assembled by :func:`dandelion_lib.training.model.assemble`
    (pixels -> backbone -> ``head``), or None for another structure."""
    inner = [ly for ly in getattr(model, "layers", []) if type(ly).__name__ != "InputLayer"]
    if len(inner) == 2 and inner[1].name == "head":
        return inner[0], inner[1]
    return None


def keras_forward(model: Any, size: int) -> Forward:
    """The Keras model as ``x -> (features, probabilities)``: one TensorFlow graph for any
    batch size, traced once (not ``model.predict`` per call, ~3x slower for one image, nor
    eager ``model(x)``, ~8x slower on EfficientNet). ``features`` is None for a model that is
    not backbone + head; backends other than TensorFlow use ``predict_on_batch``."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return lambda x: (None, model.predict_on_batch(x))
    function, features = _graph_function(model, size)

    def run(x: Any) -> tuple[Any, Any]:
        out = function(x)
        if features:
            return out[0].numpy(), out[1].numpy()
        return None, out[0].numpy()

    return run


def _graph_function(model: Any, size: int) -> tuple[Any, bool]:
    """The TensorFlow function ``x -> (features, probabilities)`` (or ``(probabilities,)``)
    and whether it returns features."""
    function, features, _ = _graph_function_maps(model, size, maps=False)
    return function, features


def _graph_function_maps(
    model: Any, size: int, *, maps: bool
) -> tuple[Any, bool, explain_lib.Explainer | None]:
    """:func:`_graph_function`; with ``maps``, for a backbone + head whose feature maps and
    head :mod:`~dandelion_lib.serving.explain` can read, the function also returns those maps
    after the probabilities, and the :class:`~dandelion_lib.serving.explain.Explainer` that
    reads them (else None)."""
    import keras
    import tensorflow as tf

    spec = [tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]
    parts = split_model(model)
    if parts is None:
        return tf.function(lambda x: (model(x, training=False),), input_signature=spec), False, None
    backbone, head = parts
    found = explain_lib.feature_maps(backbone) if maps else None
    layers = explain_lib.head_layers(head) if found else None
    if found is None or layers is None:

        def both(x: Any) -> Any:
            features = backbone(x, training=False)
            return features, head(features, training=False)

        return tf.function(both, input_signature=spec), True, None
    tensors, segments = found
    probe = keras.Model(backbone.inputs, [backbone.outputs[0], *tensors])

    def with_maps(x: Any) -> Any:
        features, *feature_maps = probe(x, training=False)
        return (features, head(features, training=False), *feature_maps)

    explainer = explain_lib.Explainer(segments, layers)
    return tf.function(with_maps, input_signature=spec), True, explainer


def export_fp32(model: Any, size: int, path: Path) -> tuple[bool, explain_lib.Explainer | None]:
    """Write the model as FP32 ONNX to ``path``; returns whether it outputs features, and
    the explainer of the feature maps it outputs after them (None: no maps).

    The graph is frozen (variables -> constants) before conversion, so every fitted
    statistic is a constant of the graph, not an input.
    """
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    function, features, explainer = _graph_function_maps(model, size, maps=True)
    frozen = convert_variables_to_constants_v2(function.get_concrete_function())
    tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=[t.name for t in frozen.inputs],
        output_names=[t.name for t in frozen.outputs],
        opset=OPSET,
        output_path=str(path),
    )
    return features, explainer


def quantize_int8(fp32: Path, path: Path, calibration: npt.NDArray[np.float32]) -> None:
    """Static INT8 quantization (QDQ, per-channel weights) calibrated on ``calibration``.

    The softmax stays in float: quantized, its output is a multiple of 1/255 and the two
    probabilities of an answer no longer add up to 1."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.rows: Iterator[npt.NDArray[np.float32]] = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            row = next(self.rows, None)
            return None if row is None else {name: row[None].astype(np.float32)}

    prepared = path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared))
        graph = onnx.load(str(prepared), load_external_data=False).graph
        softmax = [node.name for node in graph.node if node.op_type == "Softmax"]
        quantize_static(
            str(prepared),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=softmax,
        )
    finally:
        prepared.unlink(missing_ok=True)


class OnnxForward:
    """One ONNX Runtime session: ``pixels -> (features or None, probabilities)``.

    ``threads`` intra-op threads (the container's CPU limit; see
    :func:`dandelion_lib.core.config.cpu_limit`), one inter-op thread, and no spinning: on a
    shared CPU spinning workers steal the time other requests need. A batch larger than
    ``max_batch`` (the caller passes the ``inference_batch_max`` setting) runs in chunks of
    that size: ONNX Runtime's memory arena keeps the peak of the largest batch it has run, and
    past a few images a bigger batch is no faster per image on a CPU (docs/model.md, "Serving
    figures").
    """

    def __init__(
        self, path: Path, *, threads: int, features: bool, max_batch: int, maps: int = 0
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.has_features = features
        self.max_batch = max_batch
        names = [o.name for o in self.session.get_outputs()]
        answers = 2 if features else 1
        if len(names) < answers + maps:
            raise RuntimeArtifactError(
                f"{path.name} has {len(names)} outputs, the record names {answers + maps}"
            )
        self.outputs = names[:answers]
        self.map_outputs = names[answers : answers + maps]
        """The feature maps' outputs (empty: this graph cannot explain)."""

    def __call__(self, x: npt.NDArray[np.float32]) -> tuple[Any, Any]:
        outputs = self._run(x, self.outputs)
        if self.has_features:
            return outputs[0], outputs[1]
        return None, outputs[0]

    def with_maps(self, x: npt.NDArray[np.float32]) -> tuple[Any, Any, list[Any]]:
        """``(features, probabilities, feature maps (N, rows, cols, channels) each)``: the
        same answers as a plain call, and the maps for an explanation."""
        if not self.map_outputs or not self.has_features:
            raise explain_lib.ExplanationUnavailableError(
                "this model version's runtime does not output its feature maps (registered "
                "before explanations existed, or its backbone does not pool feature maps)"
            )
        outputs = self._run(x, [*self.outputs, *self.map_outputs])
        return outputs[0], outputs[1], outputs[2:]

    def _run(self, x: npt.NDArray[np.float32], names: list[str]) -> list[Any]:
        chunks = [
            self.session.run(
                names, {self.input: np.ascontiguousarray(x[i : i + self.max_batch], np.float32)}
            )
            for i in range(0, max(len(x), 1), self.max_batch)
        ]
        return [
            np.concatenate(part) if len(chunks) > 1 else part[0]
            for part in zip(*chunks, strict=True)
        ]


def _probabilities(forward: Forward, pixels: npt.NDArray[np.float32], batch: int) -> Any:
    parts = [np.asarray(forward(pixels[i : i + batch])[1]) for i in range(0, len(pixels), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def build(
    model: Any,
    size: int,
    out_dir: Path,
    *,
    keras_forward: Forward,
    parity_pixels: Any,
    calibration_pixels: npt.NDArray[np.float32] | None,
    max_batch: int,
    threads: int = 1,
    batch_size: int = 32,
) -> RuntimeRecord:
    """Convert ``model`` into ``out_dir`` (FP32, and INT8 when calibration images are given),
    check FP32 parity against ``keras_forward`` on ``parity_pixels`` (float32 model inputs:
    an array, or any sequence whose slices are arrays, read batch by batch) and write the record.
    Each runtime scores ``batch_size`` images per call, in chunks of ``max_batch`` (the
    ``inference_batch_max`` setting, as when served).

    Raises :class:`RuntimeParityError` when FP32 differs from Keras by more than
    :data:`FP32_PARITY_TOLERANCE`; nothing is left in ``out_dir`` then.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fp32 = out_dir / FILES["fp32"]
        features, explainer = export_fp32(model, size, fp32)
        explain = _save_explainer(explainer, out_dir)
        files = {"fp32": FILES["fp32"]}
        if calibration_pixels is not None and len(calibration_pixels):
            quantize_int8(fp32, out_dir / FILES["int8"], calibration_pixels)
            files["int8"] = FILES["int8"]
        reference = _probabilities(keras_forward, parity_pixels, batch_size)
        parity: dict[str, dict[str, float | int]] = {}
        for precision, name in files.items():
            runner = OnnxForward(
                out_dir / name, threads=threads, features=features, max_batch=max_batch
            )
            parity[precision] = asdict(
                Parity.between(reference, _probabilities(runner, parity_pixels, batch_size))
            )
        worst = float(parity["fp32"]["max_abs_diff"])
        if not worst <= FP32_PARITY_TOLERANCE:
            raise RuntimeParityError(
                f"the FP32 ONNX model differs from the Keras model by {worst:.2e} in probability "
                f"on {len(parity_pixels)} validation images (allowed {FP32_PARITY_TOLERANCE:g}); "
                "the model version is not registered"
            )
        record = RuntimeRecord(
            features=features,
            files=files,
            sha256={p: sha256_hex((out_dir / n).read_bytes()) for p, n in files.items()},
            parity=parity,
            calibration_images=0 if calibration_pixels is None else len(calibration_pixels),
            explain=explain,
        )
        (out_dir / RECORD).write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        return record
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _save_explainer(explainer: explain_lib.Explainer | None, out_dir: Path) -> dict[str, Any]:
    """Write the explainer beside the graphs; the record's ``explain`` entry ({} for none)."""
    if explainer is None:
        return {}
    path = out_dir / explain_lib.ARTIFACT
    explainer.save(path)
    maps = len({i for i, _ in explainer.segments})
    return {"file": path.name, "sha256": sha256_hex(path.read_bytes()), "maps": maps}


def load_explainer(model_dir: Path, record: RuntimeRecord) -> explain_lib.Explainer:
    """The explainer of a downloaded model version; raises
    :class:`~dandelion_lib.serving.explain.ExplanationUnavailableError` saying why not."""
    name = record.explain.get("file")
    if not name:
        raise explain_lib.ExplanationUnavailableError(
            "this model version cannot explain its answers: it was registered without the "
            "feature maps explanations need (retrain it to add them)"
        )
    path = model_dir / DIR / str(name)
    if not path.is_file() or sha256_hex(path.read_bytes()) != record.explain.get("sha256"):
        raise explain_lib.ExplanationUnavailableError(
            f"this model version cannot explain its answers: {DIR}/{name} is missing or corrupt"
        )
    return explain_lib.Explainer.load(path)


def load(
    model_dir: Path, precision: str, *, threads: int, max_batch: int
) -> tuple[OnnxForward, RuntimeRecord]:
    """The ``precision`` session of a downloaded model version (its ``runtime/`` folder).

    Raises :class:`RuntimeArtifactError` naming what is wrong: no runtime folder or record,
    no file for that precision, a file whose sha256 differs from the record (truncated or
    overwritten) or one ONNX Runtime refuses.
    """
    folder = model_dir / DIR
    try:
        record = RuntimeRecord.from_dict(json.loads((folder / RECORD).read_text()))
    except FileNotFoundError:
        raise RuntimeArtifactError(
            f"the model version has no runtime artifact ({DIR}/{RECORD} is missing)"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise RuntimeArtifactError(f"{DIR}/{RECORD} cannot be read: {exc}") from exc
    name = record.files.get(precision)
    if name is None:
        raise RuntimeArtifactError(f"the model version has no {precision} runtime artifact")
    path = folder / name
    if not path.is_file():
        raise RuntimeArtifactError(f"the runtime artifact {DIR}/{name} is missing")
    digest = sha256_hex(path.read_bytes())
    if record.sha256.get(precision) not in (None, digest):
        raise RuntimeArtifactError(
            f"the runtime artifact {DIR}/{name} is corrupt (its sha256 differs from the record; "
            f"{path.stat().st_size:,} bytes)"
        )
    try:
        maps = int(record.explain.get("maps", 0))
        forward = OnnxForward(
            path, threads=threads, features=record.features, max_batch=max_batch, maps=maps
        )
        return forward, record
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RuntimeArtifactError(
            f"the runtime artifact {DIR}/{name} cannot be loaded: {first}"
        ) from exc
