"""The frozen backbone's feature extractor: ONNX Runtime where it is exact, converted once.

Training and the DAGs' mapped ``extract_features`` tasks run every image through the frozen
backbone. :class:`FeatureExtractor` converts the backbone to FP32 ONNX Runtime (about twice
as fast as TensorFlow on a CPU) and checks it against TensorFlow on the first batch. That
conversion and check cost about 20 s per process (tf2onnx, then TensorFlow's first traced
batch), every time: with a feature store the converted graph is stored beside the features
of that backbone (:meth:`~dandelion_lib.data.featurestore.FeatureStore.put_converted`), and
every later extractor of the same backbone, weights and converter versions reads it
instead (about 1 s), with the difference measured when it was converted.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from dandelion_lib.core.config import Settings, cpu_limit
from dandelion_lib.data.featurestore import FeatureStore
from dandelion_lib.serving import runtime

CONVERTER_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx")
"""The packages whose versions a converted backbone depends on (besides the backbone and
its weights, which the feature store's key digests)."""


def converted_variant() -> str:
    """What converted the backbone: the converter's packages' versions and the ONNX opset,
    digested (32 hex digits). Another version converts again, under another name."""
    versions: dict[str, str | int] = {"graph": "backbone-features", "opset": runtime.OPSET}
    for package in CONVERTER_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:32]


class FeatureExtractor:
    """The frozen backbone: float32 pixels ``(N, size, size, 3)`` -> features ``(N, D)``.

    On the first batch it converts the backbone to FP32 ONNX Runtime and compares the two on
    that batch; where they agree within :data:`dandelion_lib.serving.runtime.FP32_PARITY_TOLERANCE`
    (largest absolute feature difference) every batch runs on ONNX Runtime, otherwise, or when
    the conversion fails, on the TensorFlow graph. With a ``cache`` (the feature store of this
    backbone) a graph converted and checked before is read from it instead, and one converted
    here is stored there. Nothing is converted when every feature comes from the feature
    store. ``runtime`` says which one ran (``keras`` before the first batch), ``parity`` the
    difference measured, ``cached`` whether the graph came from the cache.
    """

    def __init__(
        self,
        backbone: Any,
        *,
        max_batch: int,
        fast: bool = True,
        threads: int | None = None,
        cache: FeatureStore | None = None,
    ) -> None:
        size = int(backbone.model.input_shape[1])
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self.model = backbone.model
        self.size = size
        self.graph = tf.function(
            lambda x: backbone.model(x, training=False), input_signature=[spec]
        )
        self.fast = fast
        self.threads = threads or cpu_limit()
        self.max_batch = max_batch  # images per ONNX Runtime call (inference_batch_max)
        self.cache = cache
        self.runtime = "keras"
        self.parity: float | None = None
        self.cached = False
        self.note: str | None = None
        self._onnx: Any = None

    def __call__(self, batch: Any) -> npt.NDArray[np.float32]:
        if self.fast and self._onnx is None:
            self._start(batch)
        if self._onnx is not None:
            return np.asarray(self._onnx(np.asarray(batch, dtype=np.float32))[1])
        return np.asarray(self.graph(batch))

    def _start(self, probe: Any) -> None:
        self.fast = False  # one attempt
        variant = converted_variant()
        with tempfile.TemporaryDirectory(prefix="dandelion-backbone-") as tmp:
            path = Path(tmp) / "backbone.onnx"
            if self._read_cached(variant, path):
                return
            if self._convert(probe, path) and self.cache is not None:
                record = {"parity": self.parity, "probe_images": len(probe)}
                self.cache.put_converted(variant, path.read_bytes(), record)

    def _read_cached(self, variant: str, path: Path) -> bool:
        """Run on the graph converted before, if the cache holds one that loads."""
        found = self.cache.get_converted(variant) if self.cache is not None else None
        if found is None:
            return False
        data, record = found
        path.write_bytes(data)
        try:
            self._onnx = self._session(path)
        except Exception:  # a graph this ONNX Runtime cannot load: convert again
            return False
        self.runtime, self.cached = "onnx", True
        self.parity = float(record.get("parity", 0.0))
        return True

    def _convert(self, probe: Any, path: Path) -> bool:
        """Convert, check on ``probe``, and run on ONNX Runtime when it is exact."""
        try:
            runtime.export_fp32(self.model, self.size, path)
            onnx = self._session(path)
            reference = np.asarray(self.graph(probe))
            got = np.asarray(onnx(np.asarray(probe, dtype=np.float32))[1])
        except Exception as exc:  # any conversion failure: TensorFlow stays
            self.note = f"ONNX conversion failed: {str(exc).splitlines()[0][:200]}"
            return False
        self.parity = float(np.abs(reference - got).max()) if reference.size else 0.0
        if self.parity <= runtime.FP32_PARITY_TOLERANCE:
            self._onnx, self.runtime = onnx, "onnx"
            return True
        self.note = f"ONNX features differ by {self.parity:.1e}"
        return False

    def _session(self, path: Path) -> runtime.OnnxForward:
        return runtime.OnnxForward(
            path, threads=self.threads, features=False, max_batch=self.max_batch
        )


def feature_extractor(
    backbone: Any, settings: Settings, *, cache: FeatureStore | None = None
) -> FeatureExtractor:
    """The backbone's feature extractor (ONNX Runtime where exact, see
    :class:`FeatureExtractor`; ``extraction_runtime=keras`` keeps TensorFlow), reading and
    storing its converted graph in ``cache`` (the backbone's feature store) when given."""
    return FeatureExtractor(
        backbone,
        max_batch=settings.serving.inference_batch_max,
        fast=settings.training.extraction_runtime == "auto",
        threads=settings.serving.inference_threads,
        cache=cache,
    )


def log_extraction(extractor: Any) -> None:
    """Which runtime extracted the features (and its measured difference from TensorFlow;
    tag ``extraction_onnx_cached``: whether the converted graph came from the feature store)."""
    if not isinstance(extractor, FeatureExtractor):
        return
    mlflow.set_tag("extraction_runtime", extractor.runtime)
    if extractor.parity is not None:
        mlflow.log_metric("extraction_onnx_max_abs_diff", extractor.parity)
        mlflow.set_tag("extraction_onnx_cached", str(extractor.cached).lower())
    if extractor.note:
        mlflow.set_tag("extraction_runtime_note", extractor.note)
