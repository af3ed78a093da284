"""Typed request and response bodies (msgspec structs).

The services return these structures and the handlers return them unchanged, so the OpenAPI
schema is generated from exactly what the services produce.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ModelRef(msgspec.Struct):
    name: str | None
    version: str | None


class Explanation(msgspec.Struct):
    """Where the model looked: ``grid`` (``shape`` rows x columns, row 0 the photo's top,
    spanning the whole photo) in [0, 1], 1 where the evidence for ``class`` is strongest.
    ``class`` is the top class: the answer, or for ``uncertain`` / ``unknown`` the class the
    model leaned towards."""

    class_: str = msgspec.field(name="class")
    shape: list[int]
    grid: list[list[float]]


class PredictResponse(msgspec.Struct):
    """``label`` is a training label, ``uncertain`` (in-domain, not sure) or ``unknown``
    (neither class); ``reason`` says why for the last two (``low_confidence``,
    ``out_of_domain``); ``ood_score`` is the out-of-domain score (``None`` for a model
    without an open-set detector); ``explanation`` only when asked for (``explain=true``)."""

    prediction_id: str
    label: str
    probabilities: dict[str, float]
    confidence: float
    model: ModelRef
    latency_ms: float
    reason: str | None = None
    ood_score: float | None = None
    explanation: Explanation | msgspec.UnsetType = msgspec.UNSET


class ProblemDetail(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None
    reason: str | None = None
    errors: list[Any] | None = None


class BatchItem(msgspec.Struct, omit_defaults=True):
    """One image of a batch: ``prediction`` on success, ``error`` (a problem) otherwise."""

    index: int
    filename: str | None = None
    prediction: PredictResponse | None = None
    error: ProblemDetail | None = None


class BatchResponse(msgspec.Struct):
    results: list[BatchItem]
    succeeded: int
    failed: int


class Liveness(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct, omit_defaults=True):
    status: str
    model: ModelRef | None = None
    reason: str | None = None


class LoadFailureInfo(msgspec.Struct):
    version: str | None
    error: str
    at: str


class ServingInfo(msgspec.Struct):
    """How the loaded model runs: ``runtime`` (``onnx`` or ``keras``), ``precision``
    (``fp32`` or ``int8``), why another runtime than the one asked for runs (``note``), and
    the gate's choice with both precisions' test figures (the version's ``serving.*`` tags);
    with INT8, the FP32 recheck near a boundary (``recheck``: its margins and the photos
    rechecked since the model was loaded; None when there is none)."""

    runtime: str
    precision: str
    note: str | None
    gate: dict[str, str]
    recheck: dict[str, float] | None = None


class ModelInfo(msgspec.Struct):
    name: str
    alias: str
    state: str
    reason: str | None
    version: str | None
    uri: str | None
    loaded_at: str | None
    dataset_version: str | None
    feature_spec: dict[str, Any] | None
    metrics: dict[str, Any]
    openset: dict[str, Any] | None
    last_failure: LoadFailureInfo | None
    last_check_at: str | None
    reload_interval_s: float
    serving: ServingInfo | None = None


class FeedbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of ``POST /feedback``."""

    prediction_id: str
    correct_label: str


class FeedbackSubmission(msgspec.Struct, frozen=True):
    """Feedback as read from a JSON or multipart request (the image only from multipart)."""

    prediction_id: str
    correct_label: str
    image: bytes | None = None


class FeedbackResponse(msgspec.Struct):
    feedback_id: str
    prediction_id: str
    correct_label: str
    predicted_label: str
    agree: bool
    model: ModelRef
    image_key: str | None
    created_at: str


class ReloadResponse(msgspec.Struct):
    action: str
    version: str | None
    detail: str
    model: ModelInfo
