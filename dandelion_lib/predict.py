"""The Predictor: one model loaded from the MLflow registry, used by the API, the app and the CLI.

Its one job: turn image bytes into an answer. It accepts untrusted bytes through
:func:`dandelion_lib.images.accept_image` (formats, size limits), applies the model's logged
feature spec, runs the Keras model on a batch through one compiled graph with a free batch
dimension (traced once, at warm-up; not ``model.predict`` per call, ~3x slower for one image,
nor eager ``model(x)``, ~8x slower on EfficientNet), and answers through its
:class:`AnswerPolicy`: the one place that decides a label versus ``uncertain``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dandelion_lib import registry
from dandelion_lib.config import UNCERTAIN, Settings, get_settings
from dandelion_lib.errors import DandelionError
from dandelion_lib.features import FeatureSpec, image_stats, to_model_input
from dandelion_lib.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageLimits,
    InvalidImageError,
    accept_image,
)


class ModelUnavailableError(DandelionError):
    """The model URI cannot be resolved or loaded (one user-facing line)."""


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    confidence: float


@dataclass(frozen=True)
class AnswerPolicy:
    """The answer to a prediction: the top label, or ``uncertain`` below the threshold.

    ``ood_score`` (how far the image is from the training domain) is ``None`` today; an
    ``unknown`` answer for out-of-domain images will be decided here, next to ``uncertain``.
    """

    threshold: float = float(Settings.model_fields["confidence_threshold"].default)
    uncertain: str = UNCERTAIN

    @classmethod
    def from_settings(cls, settings: Settings) -> AnswerPolicy:
        return cls(threshold=settings.confidence_threshold)

    def answer(self, prediction: Prediction, ood_score: float | None = None) -> str:
        del ood_score  # no out-of-domain rule yet
        return prediction.label if prediction.confidence >= self.threshold else self.uncertain


@dataclass
class Predictor:
    """A loaded model plus what is needed to serve it."""

    model: Any
    spec: FeatureSpec
    name: str | None = None
    version: str | None = None
    uri: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    drift_reference: dict[str, Any] = field(default_factory=dict)
    dataset_version: str | None = None
    loaded_at: float = field(default_factory=time.time)
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    policy: AnswerPolicy = field(default_factory=AnswerPolicy)
    _forward: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, uri: str, **options: Any) -> Predictor:
        """Load ``models:/<name>@<alias>`` (or any MLflow model URI) and warm it up."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            # No progress bar in CLI output or the API's JSON logs (unless asked for).
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            # The weights are read into memory, so the download is removed right after.
            with tempfile.TemporaryDirectory(prefix="dandelion-model-") as tmp:
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
                meta = mlflow.models.Model.load(local).metadata or {}
                model = mlflow.keras.load_model(local)
        except (MlflowException, OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelUnavailableError(f"cannot load model {uri}: {first}") from exc
        name, version = _resolve(uri)
        predictor = cls(
            model=model,
            spec=FeatureSpec.from_dict(meta.get("feature_spec") or {}),
            name=name,
            version=version,
            uri=uri,
            metrics=meta.get("metrics") or {},
            drift_reference=meta.get("drift_reference") or {},
            dataset_version=meta.get("dataset_version"),
            **options,
        )
        predictor.warmup()
        return predictor

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_pixels, min_side=self.min_side)

    def decode(self, data: bytes) -> tuple[npt.NDArray[np.float32], dict[str, float]]:
        """Bytes -> (model input, image statistics). Raises InvalidImageError."""
        img = accept_image(data, self.limits).image
        return to_model_input(img, self.spec), image_stats(img)

    def answer(self, prediction: Prediction, ood_score: float | None = None) -> str:
        """The label to give for ``prediction`` (see :class:`AnswerPolicy`)."""
        return self.policy.answer(prediction, ood_score)

    def predict_arrays(self, batch: np.ndarray) -> list[Prediction]:
        """Predict a batch of model inputs ``(N, size, size, 3)``."""
        if self._forward is None:
            self._forward = _compile(self.model, self.spec.image_size)
        probs = np.asarray(self._forward(batch.astype(np.float32, copy=False)))
        out = []
        for row in probs:
            i = int(np.argmax(row))
            out.append(
                Prediction(
                    label=self.labels[i],
                    probabilities={lab: float(p) for lab, p in zip(self.labels, row, strict=True)},
                    confidence=float(row[i]),
                )
            )
        return out

    def predict_bytes(self, images: list[bytes]) -> list[Prediction]:
        """Decode and predict several images (raises on the first invalid one)."""
        if not images:
            return []
        return self.predict_arrays(np.stack([self.decode(b)[0] for b in images]))

    def warmup(self) -> None:
        size = self.spec.image_size
        for n in (1, 2):
            self.predict_arrays(np.zeros((n, size, size, 3), dtype=np.float32))


def _compile(model: Any, size: int) -> Any:
    """``model(x, training=False)`` as one graph for any batch size (TensorFlow backend);
    other backends use Keras' compiled ``predict_on_batch``."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        graph = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
        )
        return lambda x: graph(x).numpy()
    return model.predict_on_batch


def _resolve(uri: str) -> tuple[str | None, str | None]:
    """Registered name and version behind a ``models:/`` URI (None for other URIs)."""
    if not uri.startswith("models:/"):
        return None, None
    from mlflow import MlflowClient

    ref = uri[len("models:/") :]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, client.get_model_version_by_alias(name, alias).version
    name, _, version = ref.partition("/")
    return name, version or None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion predict``."""
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", help="model URI (default: models:/<name>@champion)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def cli(args: argparse.Namespace) -> int:
    settings = get_settings()
    registry.configure_mlflow(settings)
    uri = args.model or registry.model_uri(settings.model_name, settings.model_alias)
    predictor = Predictor.load(
        uri,
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
        policy=AnswerPolicy.from_settings(settings),
    )
    failed = 0
    for name in args.images:
        path = Path(name)
        try:
            x, _ = predictor.decode(path.read_bytes())
        except (InvalidImageError, OSError) as exc:
            failed += 1
            reason = getattr(exc, "reason", "unreadable")
            print(f"{path}: invalid image ({reason}): {exc}")
            continue
        p = predictor.predict_arrays(x[None])[0]
        label = predictor.answer(p)
        if args.json:
            out = {"file": str(path), "label": label, "confidence": p.confidence}
            print(
                json.dumps(
                    out | {"probabilities": p.probabilities, "model_version": predictor.version}
                )
            )
        else:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in p.probabilities.items())
            print(f"{path}: {label} (confidence {p.confidence:.3f}; {probs})")
    return 1 if failed else 0
