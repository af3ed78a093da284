"""HTTP client of the dandelion API and the web app's view model.

The API speaks JSON and answers errors as RFC 9457 ``application/problem+json``. This module
turns its answers into small typed values the app renders (:class:`ModelInfo`, :class:`Health`,
:class:`Result`, :class:`History`) and its failures into two user-facing errors:

* :class:`ApiUnavailableError` — the API cannot be reached, times out, or answers 502/503/504
  (the app shows its banner and keeps re-checking);
* :class:`ApiProblemError` — the API refused this request (e.g. a file that is not an image);
  the message is the problem's one-line detail.

No widgets and no TensorFlow here: only httpx and Pillow (for thumbnails).
"""

from __future__ import annotations

import csv
import io
import mimetypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.images import DEFAULT_MAX_PIXELS
from dandelion_lib.core.labels import DEFAULT_LABELS, NEITHER, UNCERTAIN, UNKNOWN

UPLOAD_FIELD = "file"
"""Multipart field of the image in ``POST /predict``."""
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


def csv_columns(labels: Sequence[str]) -> tuple[str, ...]:
    """Columns of the history CSV: one probability column ``p_<label>`` per class label."""
    return (
        "time",
        "file",
        "label",
        *(f"p_{lab}" for lab in labels),
        "confidence",
        "model_version",
        "prediction_id",
        "latency_ms",
        "feedback",
        "error",
        "reason",
        "ood_score",
    )


class ApiUnavailableError(DandelionError):
    """The API is unreachable, timed out or is not ready (HTTP 502/503/504)."""


class ApiProblemError(DandelionError):
    """The API refused a request with a 4xx/5xx problem (one-line message)."""

    def __init__(self, message: str, status: int, title: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.title = title


def problem_message(response: httpx.Response) -> str:
    """One line from a problem+json body (its ``detail``, else ``title``), else the status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "reason", "title"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip().splitlines()[0]
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


def percent(value: float | None, digits: int = 1) -> str:
    """``0.8734`` -> ``"87.3 %"``; ``None`` -> ``"n/a"``."""
    return "n/a" if value is None else f"{100 * value:.{digits}f} %"


@dataclass(frozen=True)
class ModelInfo:
    """The model the API serves (``GET /model``)."""

    name: str
    version: str
    alias: str | None = None
    test_accuracy: float | None = None
    loaded_at: str | None = None
    right_answers: float | None = None
    """Share of test photos whose answer is their true label (``uncertain`` and
    ``unknown`` are not right)."""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelInfo:
        metrics = body.get("metrics") or {}
        acc = metrics.get("test_accuracy")
        right = metrics.get("test_right_answers")
        loaded = body.get("loaded_at")
        if isinstance(loaded, int | float):
            loaded = datetime.fromtimestamp(loaded, UTC).isoformat(timespec="seconds")
        return cls(
            name=str(body.get("name") or "?"),
            version=str(body.get("version") or "?"),
            alias=body.get("alias"),
            test_accuracy=float(acc) if isinstance(acc, int | float) else None,
            loaded_at=loaded,
            right_answers=float(right) if isinstance(right, int | float) else None,
        )

    @property
    def headline(self) -> str:
        """``"dandelion v3 (champion) · right answers 96.9 % · test accuracy 97.5 %"`` (right
        answers only when the model's scores have them)."""
        alias = f" ({self.alias})" if self.alias else ""
        right = (
            f" · right answers {percent(self.right_answers)}"
            if self.right_answers is not None
            else ""
        )
        return (
            f"{self.name} v{self.version}{alias}{right} · "
            f"test accuracy {percent(self.test_accuracy)}"
        )


@dataclass(frozen=True)
class Health:
    """Whether the API can serve predictions now, and if not, why (for the banner)."""

    ready: bool
    reachable: bool = True
    reason: str = ""

    @property
    def title(self) -> str:
        if self.ready:
            return "Ready"
        return "Model not ready" if self.reachable else "API unavailable"


@dataclass
class Result:
    """One uploaded file and what the API said about it.

    ``label`` is a class, ``uncertain`` (the model is not sure) or ``unknown`` (the photo
    shows neither class); ``reason`` says why for the last two (``low_confidence``,
    ``out_of_domain``); ``ood_score`` is the model's out-of-domain score (None for a model
    without an open-set detector).
    """

    filename: str
    size: int
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None
    prediction_id: str | None = None
    model_version: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    feedback: str | None = None
    reason: str | None = None
    ood_score: float | None = None
    explanation: dict[str, Any] | None = None
    """Where the model looked (the API's ``explanation``: ``class``, ``shape``, ``grid``)."""
    explain_note: str | None = None
    """Why there is no explanation although one was asked for."""
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def ok(self) -> bool:
        return self.error is None and self.label is not None

    @property
    def uncertain(self) -> bool:
        return self.label == UNCERTAIN

    @property
    def unknown(self) -> bool:
        """The API answered that the photo shows neither class (out of domain)."""
        return self.label == UNKNOWN

    def feedback_choices(self) -> list[tuple[str, str]]:
        """``(button text, correct_label)`` pairs offered to the user for this result.

        The labels are the model's own (the keys of the answer's ``probabilities``), then
        ``("Neither", "neither")``: the photo shows neither class.
        """
        labels = list(self.probabilities)
        if not self.ok or not self.prediction_id or not labels:
            return []
        neither = ("Neither", NEITHER)
        if self.label not in labels:  # uncertain or unknown: the user says what it is
            return [*((f"It is {lab}", lab) for lab in labels), neither]
        other = next(lab for lab in labels if lab != self.label)
        return [("Correct", str(self.label)), (f"Wrong: it is {other}", other), neither]

    def read_answer(self, body: dict[str, Any]) -> None:
        """Take the answer fields from the JSON body of the API's ``POST /predict``."""
        explanation = body.get("explanation")
        self.explanation = explanation if isinstance(explanation, dict) else None
        model = body.get("model") or {}
        self.label = str(body["label"])
        self.probabilities = {k: float(v) for k, v in (body.get("probabilities") or {}).items()}
        self.confidence = float(body["confidence"]) if "confidence" in body else None
        self.prediction_id = str(body["prediction_id"]) if body.get("prediction_id") else None
        self.model_version = str(model["version"]) if model.get("version") else None
        self.latency_ms = float(body["latency_ms"]) if "latency_ms" in body else None
        self.reason = str(body["reason"]) if body.get("reason") else None
        score = body.get("ood_score")
        self.ood_score = float(score) if isinstance(score, int | float) else None

    def row(self, labels: Sequence[str]) -> dict[str, Any]:
        """A flat record for the history table and the CSV export (:func:`csv_columns`)."""
        p = self.probabilities
        return {
            "time": self.time,
            "file": self.filename,
            "label": self.label or "",
            **{f"p_{lab}": "" if lab not in p else round(p[lab], 4) for lab in labels},
            "confidence": "" if self.confidence is None else round(self.confidence, 4),
            "model_version": self.model_version or "",
            "prediction_id": self.prediction_id or "",
            "latency_ms": "" if self.latency_ms is None else round(self.latency_ms, 1),
            "feedback": self.feedback or "",
            "error": self.error or "",
            "reason": self.reason or "",
            "ood_score": "" if self.ood_score is None else round(self.ood_score, 4),
        }


class History:
    """The results of this app session, newest first; ``labels`` name the CSV's probability
    columns."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self._items: list[Result] = []

    def add(self, result: Result) -> None:
        self._items.insert(0, result)

    def __iter__(self) -> Iterator[Result]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def rows(self) -> list[dict[str, Any]]:
        return [r.row(self.labels) for r in self._items]

    def to_csv(self) -> bytes:
        """The history as CSV (UTF-8, header row, newest first)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=csv_columns(self.labels), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buf.getvalue().encode("utf-8")


def content_type(filename: str) -> str:
    """The MIME type guessed from a file name (``application/octet-stream`` if unknown)."""
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def make_thumbnail(
    data: bytes,
    size: int = 160,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    explanation: dict[str, Any] | None = None,
) -> bytes | None:
    """A small JPEG preview of an image, or None when the bytes are not a decodable image.
    With ``explanation`` (an answer's), the preview has the map drawn over it
    (:func:`dandelion_lib.serving.explain.overlay`: a colour map with transparency, stretched
    to the photo's aspect ratio).

    Only the header is trusted for the pixel count, so a decompression bomb is never decoded.
    Without Pillow installed (it is optional for the app) there is no preview either.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                return None
            img.draft("RGB", (size, size))
            thumb = ImageOps.exif_transpose(img).convert("RGB")
            thumb.thumbnail((size, size))
            if explanation is not None:
                import numpy as np

                from dandelion_lib.serving.explain import overlay

                thumb = overlay(thumb, np.asarray(explanation["grid"], dtype=np.float32))
            out = io.BytesIO()
            thumb.save(out, format="JPEG", quality=85)
            return out.getvalue()
    except Exception:  # any undecodable input just has no preview
        return None


class ApiClient:
    """Synchronous client of the dandelion API (one connection pool per app session)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        labels: tuple[str, ...] = DEFAULT_LABELS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.labels = labels
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
            headers={"Accept": "application/json, application/problem+json"},
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiUnavailableError(f"the API at {self.base_url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise ApiUnavailableError(f"cannot reach the API at {self.base_url}") from exc
        if response.status_code in UNAVAILABLE_STATUSES:
            raise ApiUnavailableError(
                f"the API is unavailable (HTTP {response.status_code}): {problem_message(response)}"
            )
        if response.status_code >= 400:
            body_title = ""
            try:
                body = response.json()
                if isinstance(body, dict):
                    body_title = str(body.get("title") or "")
            except ValueError:
                pass
            raise ApiProblemError(problem_message(response), response.status_code, body_title)
        return response

    def health(self) -> Health:
        """Readiness (``GET /health/ready``); never raises."""
        try:
            response = self._http.get("/health/ready")
        except httpx.HTTPError:
            return Health(False, reachable=False, reason=f"cannot reach the API at {self.base_url}")
        if response.status_code == 200:
            return Health(True)
        return Health(False, reachable=True, reason=problem_message(response))

    def model(self) -> ModelInfo:
        """The served model (``GET /model``)."""
        return ModelInfo.from_json(self._request("GET", "/model").json())

    def predict(
        self, filename: str, data: bytes, *, explain: bool = False, review: bool = False
    ) -> Result:
        """Classify one file. A refused file gives a Result with ``error`` set. With
        ``explain`` the answer says where the model looked (``explanation``); a model that
        cannot (the API's 409) answers without, and ``explain_note`` says why. ``review``:
        a photo already answered, looked at again (``purpose=review``): the API does not
        count it as a user's prediction.

        Raises ApiUnavailableError when the API cannot answer at all.
        """
        result = Result(filename=filename, size=len(data))
        files = {UPLOAD_FIELD: (filename, data, content_type(filename))}
        try:
            try:
                response = self._request("POST", _predict_path(explain, review), files=files)
            except ApiProblemError as exc:
                if not explain or exc.status != 409:
                    raise
                result.explain_note = str(exc).removesuffix("; ask without explain")
                response = self._request("POST", _predict_path(False, review), files=files)
        except ApiProblemError as exc:
            result.error = str(exc)
            return result
        result.read_answer(response.json())
        return result

    def feedback(
        self,
        prediction_id: str,
        correct_label: str,
        image: bytes | None = None,
        filename: str = "image",
    ) -> dict[str, Any]:
        """Record the user's verdict on a prediction (``POST /feedback``): a class, or
        ``neither`` when the photo shows neither class.

        With ``image``, the photo is stored with the feedback (multipart), so reviewed
        feedback can join the next dataset version; without it, a JSON body is sent.
        """
        allowed = (*self.labels, NEITHER)
        if correct_label not in allowed:
            raise DandelionError(f"correct_label must be one of {', '.join(allowed)}")
        fields = {"prediction_id": prediction_id, "correct_label": correct_label}
        if image:
            response = self._request(
                "POST",
                "/feedback",
                data=fields,
                files={"image": (filename, image, content_type(filename))},
            )
        else:
            response = self._request("POST", "/feedback", json=fields)
        try:
            body = response.json()
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}


def _predict_path(explain: bool, review: bool) -> str:
    """``/predict`` with its query: ``explain=true``, ``purpose=review`` when asked."""
    query = [q for q, on in (("explain=true", explain), ("purpose=review", review)) if on]
    return "/predict" + ("?" + "&".join(query) if query else "")
