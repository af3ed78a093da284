"""The Predictor: one model loaded from the MLflow registry, used by the API, the app and the CLI.

Its one job: turn image bytes into an answer. It accepts untrusted bytes through
:func:`dandelion_lib.images.accept_image` (formats, size limits), applies the model's logged
feature spec, runs the Keras model on a batch through one compiled graph with a free batch
dimension (traced once, at warm-up; not ``model.predict`` per call, ~3x slower for one image,
nor eager ``model(x)``, ~8x slower on EfficientNet), and answers through its
:class:`AnswerPolicy`: the one place that decides a label, ``uncertain`` or ``unknown``.

The graph returns the backbone's features beside the probabilities; a model logged with an
open-set detector (``openset.npz`` next to the Keras model, its parameters in the metadata)
scores them, and every :class:`Prediction` then carries an out-of-domain score.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dandelion_lib import registry
from dandelion_lib.config import UNCERTAIN, UNKNOWN, Settings, get_settings
from dandelion_lib.errors import DandelionError
from dandelion_lib.features import FeatureSpec, image_stats, to_model_input
from dandelion_lib.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageLimits,
    InvalidImageError,
    accept_image,
)
from dandelion_lib.openset import ARTIFACT_NAME, OpenSetDetector, OpenSetError


class ModelUnavailableError(DandelionError):
    """The model URI cannot be resolved or loaded (one user-facing line)."""


@dataclass(frozen=True)
class Prediction:
    """The model's output for one image. ``label`` is the top class; ``ood_score`` is the
    open-set detector's out-of-domain score (higher = less like the training photos), or
    ``None`` for a model without a detector."""

    label: str
    probabilities: dict[str, float]
    confidence: float
    ood_score: float | None = None


OUT_OF_DOMAIN = "out_of_domain"
"""Reason of an ``unknown`` answer: the open-set detector's score is above its threshold."""
LOW_CONFIDENCE = "low_confidence"
"""Reason of an ``uncertain`` answer: the top probability is below the threshold."""


@dataclass(frozen=True)
class Answer:
    """What the user is told: a training label, ``unknown`` or ``uncertain``, and why
    (``None`` for a plain label)."""

    label: str
    reason: str | None = None


@dataclass(frozen=True)
class AnswerPolicy:
    """The one rule from a prediction to an answer, in this order:

    1. ``unknown`` (reason ``out_of_domain``) when the out-of-domain score is above
       ``ood_threshold`` (the detector's calibrated threshold): the photo is neither class;
    2. ``uncertain`` (reason ``low_confidence``) when the top probability is below
       ``threshold``: in-domain, but the model is not sure;
    3. otherwise the top label.
    """

    threshold: float = float(Settings.model_fields["confidence_threshold"].default)
    uncertain: str = UNCERTAIN
    unknown: str = UNKNOWN
    ood_threshold: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AnswerPolicy:
        return cls(threshold=settings.confidence_threshold)

    def decide(self, prediction: Prediction) -> Answer:
        score = prediction.ood_score
        if self.ood_threshold is not None and score is not None and score > self.ood_threshold:
            return Answer(self.unknown, OUT_OF_DOMAIN)
        if not prediction.confidence >= self.threshold:
            return Answer(self.uncertain, LOW_CONFIDENCE)
        return Answer(prediction.label)

    def answer(self, prediction: Prediction) -> str:
        return self.decide(prediction).label


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
    detector: OpenSetDetector | None = None
    """The model's open-set detector; its threshold becomes the policy's ``ood_threshold``."""
    _forward: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.detector is not None and self.policy.ood_threshold is None:
            self.policy = dataclasses.replace(self.policy, ood_threshold=self.detector.threshold)

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
                try:
                    model = mlflow.keras.load_model(local)
                except (MlflowException, OSError, ValueError, zipfile.BadZipFile) as exc:
                    # Keras says "File not found" for any file that is not a zip archive.
                    problem = _model_file_problem(Path(local))
                    if problem is None:
                        raise
                    raise ModelUnavailableError(f"cannot load model {uri}: {problem}") from exc
                detector = _load_detector(Path(local), meta)
        except (MlflowException, OSError, ValueError, zipfile.BadZipFile, OpenSetError) as exc:
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
            detector=detector,
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

    def answer(self, prediction: Prediction) -> str:
        """The label to give for ``prediction`` (see :class:`AnswerPolicy`)."""
        return self.policy.answer(prediction)

    def decide(self, prediction: Prediction) -> Answer:
        """The answer and its reason for ``prediction`` (see :class:`AnswerPolicy`)."""
        return self.policy.decide(prediction)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        if self._forward is None:
            self._forward = _compile(self.model, self.spec.image_size)
        features, probs = self._forward(batch.astype(np.float32, copy=False))
        return features, np.asarray(probs)

    def predict_arrays(self, batch: np.ndarray) -> list[Prediction]:
        """Predict a batch of model inputs ``(N, size, size, 3)``."""
        features, probs = self._run(batch)
        scores: list[float | None] = [None] * len(probs)
        if self.detector is not None and features is not None:
            scores = [float(v) for v in self.detector.score(features)]
        out = []
        for row, score in zip(probs, scores, strict=True):
            i = int(np.argmax(row))
            out.append(
                Prediction(
                    label=self.labels[i],
                    probabilities={lab: float(p) for lab, p in zip(self.labels, row, strict=True)},
                    confidence=float(row[i]),
                    ood_score=score,
                )
            )
        return out

    def features(self, pixels: np.ndarray, batch_size: int = 32) -> npt.NDArray[np.float32]:
        """The backbone features ``(N, D)`` of model inputs, exactly as served."""
        parts = []
        for start in range(0, len(pixels), batch_size):
            feats, _ = self._run(np.asarray(pixels[start : start + batch_size]))
            if feats is None:
                raise DandelionError("this model does not expose its backbone's features")
            parts.append(np.asarray(feats, dtype=np.float32))
        if not parts:
            raise DandelionError("no images to extract features from")
        return np.concatenate(parts)

    def predict_bytes(self, images: list[bytes]) -> list[Prediction]:
        """Decode and predict several images (raises on the first invalid one)."""
        if not images:
            return []
        return self.predict_arrays(np.stack([self.decode(b)[0] for b in images]))

    def warmup(self) -> None:
        size = self.spec.image_size
        for n in (1, 2):
            self.predict_arrays(np.zeros((n, size, size, 3), dtype=np.float32))


def _model_file_problem(local: Path) -> str | None:
    """What is wrong with the downloaded Keras model file, when something is: missing, not a
    zip archive (truncated or overwritten) or a member failing its CRC check (corrupt)."""
    files = sorted(local.rglob("*.keras"))
    if not files:
        return "the model file (model.keras) is missing from the model version"
    for path in files:
        name = path.relative_to(local).as_posix()
        size = path.stat().st_size
        if not zipfile.is_zipfile(path):
            return f"the model file {name} is corrupt (not a .keras zip archive; {size:,} bytes)"
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"the model file {name} is corrupt ({exc})"
        if bad is not None:
            return f"the model file {name} is corrupt (its member {bad} fails its CRC check)"
    return None


def _load_detector(local: Path, meta: dict[str, Any]) -> OpenSetDetector | None:
    """The model's open-set detector, or None for a model logged without one."""
    if not meta.get("openset"):
        return None
    path = local / ARTIFACT_NAME
    if not path.is_file():
        raise OpenSetError(
            f"the model's metadata names an open-set detector but {ARTIFACT_NAME} is missing"
        )
    return OpenSetDetector.load(path)


def split_model(model: Any) -> tuple[Any, Any] | None:
    """``(backbone, head)`` of a model assembled by :func:`dandelion_lib.model.assemble`
    (pixels -> backbone -> ``head``), or None for another structure."""
    inner = [ly for ly in getattr(model, "layers", []) if type(ly).__name__ != "InputLayer"]
    if len(inner) == 2 and inner[1].name == "head":
        return inner[0], inner[1]
    return None


def _compile(model: Any, size: int) -> Any:
    """``x -> (features, probabilities)`` as one graph for any batch size (TensorFlow
    backend; ``features`` is None for a model that is not backbone + head); other backends
    use Keras' compiled ``predict_on_batch`` (no features)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return lambda x: (None, model.predict_on_batch(x))
    import tensorflow as tf

    spec = [tf.TensorSpec([None, size, size, 3], tf.float32)]
    parts = split_model(model)
    if parts is None:
        graph = tf.function(lambda x: model(x, training=False), input_signature=spec)
        return lambda x: (None, graph(x).numpy())
    backbone, head = parts

    def both(x: Any) -> Any:
        features = backbone(x, training=False)
        return features, head(features, training=False)

    pair = tf.function(both, input_signature=spec)

    def run(x: Any) -> tuple[Any, Any]:
        features, probs = pair(x)
        return features.numpy(), probs.numpy()

    return run


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
        answer = predictor.decide(p)
        if args.json:
            out: dict[str, Any] = {"file": str(path), "label": answer.label}
            out |= {"reason": answer.reason}
            out |= {"confidence": p.confidence, "probabilities": p.probabilities}
            print(json.dumps(out | {"ood_score": p.ood_score, "model_version": predictor.version}))
        else:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in p.probabilities.items())
            ood = "" if p.ood_score is None else f"; out-of-domain score {p.ood_score:.2f}"
            print(f"{path}: {answer.label} (confidence {p.confidence:.3f}; {probs}{ood})")
    return 1 if failed else 0
