"""The Predictor: one model loaded from the MLflow registry, used by the API, the app and the CLI.

Its one job: turn image bytes into an answer. It accepts untrusted bytes through
:func:`dandelion_lib.core.images.accept_image` (formats, size limits), applies the model's logged
feature spec, runs one forward pass per batch that returns the backbone's features beside the
probabilities, and answers through its :class:`AnswerPolicy`: the one place that decides a
label, ``uncertain`` or ``unknown``.

What runs the forward pass (:meth:`Predictor.load`, setting ``serving_runtime`` of the settings
the caller passes): the version's ONNX Runtime artifact (:mod:`dandelion_lib.serving.runtime`)
in the precision the promotion gate chose (tag ``serving.precision``), falling back to FP32 ONNX
and then to the Keras model (traced once into a TensorFlow graph) when an artifact is missing or
corrupt; ``runtime_note`` says why.

Asked to (``explain``), it also says where the model looked: a class activation map for the top
class, from the feature maps the same forward pass returns (:mod:`dandelion_lib.serving.explain`;
ONNX runtimes of versions registered with them only).

A model logged with an open-set detector (``openset.npz`` next to the Keras model, its
parameters in the metadata) scores the features, and every :class:`Prediction` then carries an
out-of-domain score.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dandelion_lib.core.config import Settings, cpu_limit
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.face_settings import ServingSettings
from dandelion_lib.core.features import FeatureSpec, image_stats, to_model_input
from dandelion_lib.core.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    DecodeBudget,
    ImageLimits,
    accept_image,
)
from dandelion_lib.core.labels import UNCERTAIN, UNKNOWN
from dandelion_lib.serving import runtime as runtime_lib
from dandelion_lib.serving.explain import Explainer, Explanation, ExplanationUnavailableError
from dandelion_lib.serving.loading import (
    Loaded,
    ModelUnavailableError,
    load_detector,
    load_keras,
    load_runtime,
    read_metadata,
    resolve,
)
from dandelion_lib.serving.recheck import Outputs, Recheck
from dandelion_lib.training.openset import OpenSetDetector, OpenSetError

if TYPE_CHECKING:  # pandas behind it: not at DAG parse time
    from dandelion_lib.training.inputs import Pixels

SERVING_TAG = "serving."
"""Prefix of the model-version tags that record the gate's runtime choice."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The model's output for one image. ``label`` is the top class; ``ood_score`` is the
    open-set detector's out-of-domain score (higher = less like the training photos), or
    ``None`` for a model without a detector."""

    label: str
    probabilities: dict[str, float]
    confidence: float
    ood_score: float | None = None
    explanation: Explanation | None = None
    """Where the model looked, for the top class ``label`` (only when asked for)."""
    blank: bool = False
    """The image is one flat colour (:func:`blank_inputs`): nothing in it to classify."""


BLANK_IMAGE = "blank_image"
"""Reason of an ``unknown`` answer: the image is one flat colour (an all-black frame, a lens
cap), whatever the model's probabilities (it answered an all-black image ``grass`` at 91 %)."""
BLANK_STD = 2.0
"""A model input is blank when no channel's values (0-255) vary by this standard deviation:
a flat frame, JPEG-compressed or not, varies by 0; the flattest of the reference photos (the
dev sets included, 893 photos) by 13 or more."""


BLANK_SAMPLE_STEP = 8
"""Every this many rows of a model input are read first by :func:`blank_inputs`."""


def _channel_std(pixels: np.ndarray) -> np.ndarray:
    """The standard deviation per image and channel of pixels ``(N, P, C)``, computed over
    channel-contiguous copies (a reduction along a strided axis is several times slower)."""
    std: np.ndarray = np.ascontiguousarray(pixels.transpose(0, 2, 1)).std(axis=2)
    return std


def blank_inputs(batch: np.ndarray) -> list[bool]:
    """Which model inputs ``(N, size, size, 3)`` are blank: one flat colour (:data:`BLANK_STD`).

    Exact, and cheap for photos: every :data:`BLANK_SAMPLE_STEP`-th row is measured first. For
    any subset S of an image's P pixels, the squared deviations over S from the image's mean
    sum to at least those from S's own mean, so ``var >= |S| / P * var_S``: a photo whose
    sampled rows already bound a channel's deviation at :data:`BLANK_STD` or more is not blank.
    Only the others (flat or nearly so) are measured whole."""
    pixels = np.asarray(batch, dtype=np.float32)
    if len(pixels) == 0:
        return []
    n, channels = len(pixels), pixels.shape[-1]
    sample = pixels[:, ::BLANK_SAMPLE_STEP].reshape(n, -1, channels)
    share = sample.shape[1] * channels / pixels[0].size
    bound = _channel_std(sample).max(axis=1) * np.sqrt(share)
    return [
        False
        if bound[i] >= BLANK_STD
        else bool(_channel_std(pixels[i : i + 1].reshape(1, -1, channels)).max() < BLANK_STD)
        for i in range(n)
    ]


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

    0. ``unknown`` (reason ``blank_image``) when the image is one flat colour: there is
       nothing to classify, whatever the model's probabilities;
    1. ``unknown`` (reason ``out_of_domain``) when the out-of-domain score is above
       ``ood_threshold`` (the detector's calibrated threshold): the photo is neither class;
    2. ``uncertain`` (reason ``low_confidence``) when the top probability is below
       ``threshold``: in-domain, but the model is not sure;
    3. otherwise the top label.
    """

    threshold: float = float(ServingSettings.model_fields["confidence_threshold"].default)
    uncertain: str = UNCERTAIN
    unknown: str = UNKNOWN
    ood_threshold: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AnswerPolicy:
        return cls(threshold=settings.serving.confidence_threshold)

    def decide(self, prediction: Prediction) -> Answer:
        if prediction.blank:
            return Answer(self.unknown, BLANK_IMAGE)
        score = prediction.ood_score
        if self.ood_threshold is not None and score is not None and score > self.ood_threshold:
            return Answer(self.unknown, OUT_OF_DOMAIN)
        if not prediction.confidence >= self.threshold:
            return Answer(self.uncertain, LOW_CONFIDENCE)
        return Answer(prediction.label)


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
    runtime: str = "keras"
    """What runs the model: ``onnx`` (ONNX Runtime artifact) or ``keras``."""
    precision: str = "fp32"
    runtime_note: str | None = None
    """Why the runtime asked for is not the one running (a missing or corrupt artifact)."""
    serving: dict[str, str] = field(default_factory=dict)
    """The version's ``serving.*`` tags: the gate's runtime choice and its figures."""
    explainer: Explainer | None = None
    """Reads the runtime's feature maps into explanations (None: :attr:`explain_unavailable`)."""
    explain_unavailable: str | None = "this model cannot explain its answers"
    """Why :meth:`predict_arrays` cannot explain (None when it can)."""
    recheck: Recheck | None = None
    """INT8 served: FP32 answers the photos near a boundary (:mod:`.recheck`)."""
    _forward: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.detector is not None and self.policy.ood_threshold is None:
            self.policy = dataclasses.replace(self.policy, ood_threshold=self.detector.threshold)

    @classmethod
    def load(
        cls,
        uri: str,
        settings: Settings,
        *,
        runtime: str | None = None,
        precision: str | None = None,
        threads: int | None = None,
        **options: Any,
    ) -> Predictor:
        """Load ``models:/<name>@<alias>`` (or any MLflow model URI) and warm it up.

        ``runtime`` (default: ``settings.serving.serving_runtime``): ``auto`` runs the version's
        ONNX artifact in ``precision`` (default: the ``serving.precision`` tag the gate set,
        else ``fp32``), falling back to FP32 ONNX and then to Keras when an artifact is
        missing or corrupt (the reason is kept in ``runtime_note``); ``onnx`` fails instead
        of falling back; ``keras`` always loads Keras. ``threads``: intra-op threads (default:
        ``inference_threads``, else the CPU limit); ONNX runs ``inference_batch_max`` at most.
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        runtime = runtime or settings.serving.serving_runtime
        threads = threads or settings.serving.inference_threads or cpu_limit()
        try:
            # No progress bar in CLI output or the API's JSON logs (unless asked for).
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            # The weights are read into memory, so the download is removed right after.
            with tempfile.TemporaryDirectory(prefix="dandelion-model-") as tmp:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
                meta = read_metadata(local)
                name, version, tags = resolve(uri)
                serving = {k: v for k, v in tags.items() if k.startswith(SERVING_TAG)}
                wanted = precision or serving.get(SERVING_TAG + "precision") or "fp32"
                loaded = load_runtime(uri, local, runtime, wanted, settings, threads)
                model = None if loaded.forward is not None else load_keras(uri, local)
                detector = load_detector(local, meta)
        except (MlflowException, OSError, ValueError, zipfile.BadZipFile, OpenSetError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelUnavailableError(f"cannot load model {uri}: {first}") from exc
        predictor = cls._of(
            loaded,
            model=model,
            spec=FeatureSpec.from_dict(meta.get("feature_spec") or {}),
            name=name,
            version=version,
            uri=uri,
            metrics=meta.get("metrics") or {},
            drift_reference=meta.get("drift_reference") or {},
            dataset_version=meta.get("dataset_version"),
            detector=detector,
            serving=serving,
            **options,
        )
        predictor.warmup()
        return predictor

    @classmethod
    def from_folder(
        cls,
        local: Path,
        settings: Settings,
        *,
        spec: FeatureSpec,
        precision: str,
        runtime: str = "onnx",
        model: Any = None,
        detector: OpenSetDetector | None = None,
    ) -> Predictor:
        """A model not registered yet: its ``runtime/`` folder under ``local`` as built by
        training (ONNX in ``precision``), or the Keras ``model`` in memory with ``runtime``
        ``keras``. Raises :class:`ModelUnavailableError` when the artifact cannot be loaded."""
        threads = settings.serving.inference_threads or cpu_limit()
        loaded = load_runtime(str(local), local, runtime, precision, settings, threads)
        model = model if loaded.forward is None else None
        return cls._of(loaded, model=model, spec=spec, detector=detector)

    @classmethod
    def _of(cls, loaded: Loaded, **fields: Any) -> Predictor:
        """A Predictor running what :func:`~.loading.load_runtime` loaded, with ``fields``."""
        predictor = cls(
            runtime=loaded.runtime,
            precision=loaded.precision,
            runtime_note=loaded.note,
            **(fields | loaded.fields()),
        )
        predictor._forward = loaded.forward
        return predictor

    @classmethod
    def load_for_users(cls, uri: str, settings: Settings) -> Predictor:
        """:meth:`load` as users are answered: with the settings' image limits and answer
        policy (the API, ``dandelion predict`` and ``dandelion evaluate``)."""
        return cls.load(
            uri,
            settings,
            max_pixels=settings.images.max_image_pixels,
            min_side=settings.images.min_image_side,
            policy=AnswerPolicy.from_settings(settings),
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(
            max_pixels=self.max_pixels, min_side=self.min_side, decode_side=self.spec.decode_side
        )

    def decode(
        self, data: bytes, budget: DecodeBudget | None = None
    ) -> tuple[npt.NDArray[np.float32], dict[str, float]]:
        """Bytes -> (model input, image statistics), decoded at the size the model needs
        (within ``budget`` when given). Raises InvalidImageError (DecodeBudgetExceeded)."""
        img = accept_image(data, self.limits, budget).image
        return to_model_input(img, self.spec), image_stats(img)

    def decide(self, prediction: Prediction) -> Answer:
        """The answer and its reason for ``prediction`` (see :class:`AnswerPolicy`)."""
        return self.policy.decide(prediction)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        if self._forward is None:
            self._forward = runtime_lib.keras_forward(self.model, self.spec.image_size)
        features, probs = self._forward(batch.astype(np.float32, copy=False))
        return features, np.asarray(probs)

    def _outputs(self, batch: np.ndarray, explain: bool) -> Outputs:
        """Features, probabilities, (``explain``) feature maps and open-set scores of
        ``batch``; with an INT8 runtime, FP32's for the photos INT8 puts near a boundary
        (:mod:`.recheck`)."""
        maps: list[Any] = []
        if explain:
            if self.explainer is None or self.explain_unavailable is not None:
                raise ExplanationUnavailableError(
                    self.explain_unavailable or "this model cannot explain its answers"
                )
            features, probs, maps = self._forward.with_maps(batch.astype(np.float32, copy=False))
        else:
            features, probs = self._run(batch)
        score = None if self.detector is None or features is None else self.detector.score
        outputs = (features, np.asarray(probs), maps, None if score is None else score(features))
        if self.recheck is None:
            return outputs
        return self.recheck.apply(
            batch, outputs, score, self.policy.ood_threshold, self.policy.threshold
        )

    def predict_arrays(
        self, batch: np.ndarray, explain: bool | list[bool] = False
    ) -> list[Prediction]:
        """Predict a batch of model inputs ``(N, size, size, 3)``; ``explain`` (for all, or
        per image) adds an :class:`~dandelion_lib.serving.explain.Explanation` of the top
        class, from the same forward pass. Raises
        :class:`~dandelion_lib.serving.explain.ExplanationUnavailableError` when explanations
        are asked for and this model cannot give them (:attr:`explain_unavailable`)."""
        wanted = [explain] * len(batch) if isinstance(explain, bool) else list(explain)
        features, probs, maps, ood = self._outputs(batch, any(wanted))
        scores = [None] * len(probs) if ood is None else [float(v) for v in ood]
        blank = blank_inputs(batch)
        out = []
        for n, (row, score) in enumerate(zip(probs, scores, strict=True)):
            i = int(np.argmax(row))
            explanation = None
            if maps and wanted[n]:
                assert self.explainer is not None and features is not None
                explanation = self.explainer.explain(
                    [m[n] for m in maps], features[n], i, self.labels[i]
                )
            out.append(
                Prediction(
                    label=self.labels[i],
                    probabilities={lab: float(p) for lab, p in zip(self.labels, row, strict=True)},
                    confidence=float(row[i]),
                    ood_score=score,
                    explanation=explanation,
                    blank=blank[n],
                )
            )
        return out

    def features(self, pixels: Pixels, batch_size: int = 32) -> npt.NDArray[np.float32]:
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

    def predict_bytes(self, images: list[bytes], explain: bool = False) -> list[Prediction]:
        """Decode and predict several images (raises on the first invalid one)."""
        if not images:
            return []
        return self.predict_arrays(np.stack([self.decode(b)[0] for b in images]), explain)

    def warmup(self) -> None:
        size = self.spec.image_size
        for n in (1, 2):
            self.predict_arrays(np.zeros((n, size, size, 3), dtype=np.float32))
            if self.recheck is not None:
                self.recheck.forward(np.zeros((n, size, size, 3), dtype=np.float32))
