"""The app's HTTP client against the real API (``python -m api``) serving a real registered
model from the real MLflow server (see ``app_api`` in conftest.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.face_settings import ServingSettings
from dashboards.client import ApiClient, ApiProblemError, ApiUnavailableError, Health
from tests.app.conftest import APP_MODEL, AppApi, dead_url

THRESHOLD = ServingSettings.model_fields["confidence_threshold"].default


def test_not_ready_then_ready(app_api: AppApi) -> None:
    before = app_api.before_ready["health"]
    assert (before.ready, before.reachable, before.title) == (False, True, "Model not ready")
    assert before.reason and "\n" not in before.reason
    assert isinstance(app_api.before_ready["predict_error"], ApiUnavailableError)
    with ApiClient(app_api.url) as client:
        assert client.health() == Health(True)
        info = client.model()
    assert (info.name, info.version, info.alias) == (APP_MODEL, app_api.version, "champion")
    assert info.test_accuracy == pytest.approx(0.7)
    assert info.headline == f"{APP_MODEL} v{app_api.version} (champion) · test accuracy 70.0 %"


def test_predictions_are_the_models(app_api: AppApi, greenr_dir: Path) -> None:
    reference = app_api.registry.predictor(app_api.version)
    with ApiClient(app_api.url) as client:
        for path in (
            sorted((greenr_dir / "dandelion").glob("*.jpg"))[:3]
            + sorted((greenr_dir / "grass").glob("*.jpg"))[:3]
        ):
            data = path.read_bytes()
            result = client.predict(path.name, data)
            expected = reference.predict_bytes([data])[0]
            assert result.ok, result.error
            assert result.probabilities == pytest.approx(expected.probabilities, abs=1e-4)
            assert result.confidence == pytest.approx(expected.confidence, abs=1e-4)
            assert expected.ood_score is not None  # the served model has an open-set detector
            assert result.ood_score == pytest.approx(expected.ood_score, abs=1e-3)
            answer = reference.decide(expected)
            assert (result.label, result.reason) == (answer.label, answer.reason)
            if answer.label != "unknown":
                uncertain = expected.confidence < THRESHOLD
                assert result.label == ("uncertain" if uncertain else expected.label)
            assert result.model_version == app_api.version
            assert result.prediction_id and result.latency_ms is not None


def test_refused_files_give_one_line_errors(app_api: AppApi, greenr_dir: Path) -> None:
    jpeg = (greenr_dir / "dandelion" / "00000000.jpg").read_bytes()
    with ApiClient(app_api.url) as client:
        for name, data in [
            ("notes.txt", b"this is not an image"),
            ("empty.jpg", b""),
            ("truncated.jpg", jpeg[: len(jpeg) // 2]),
            ("page.html", b"<html><body>hi</body></html>"),
        ]:
            result = client.predict(name, data)
            assert not result.ok and result.label is None, name
            assert result.error and "\n" not in result.error, name


def test_feedback_is_stored_with_the_photo(app_api: AppApi, greenr_dir: Path) -> None:
    data = (greenr_dir / "grass" / "00000001.jpg").read_bytes()
    store = app_api.feedback_store()
    with ApiClient(app_api.url) as client:
        result = client.predict("lawn.jpg", data)
        body = client.feedback(str(result.prediction_id), "grass", image=data, filename="lawn.jpg")
        record = store.get_feedback(body["feedback_id"])
        assert record is not None
        assert (record.prediction_id, record.correct_label) == (result.prediction_id, "grass")
        assert record.image_key and record.image_key.startswith("feedback/")
        with pytest.raises(ApiProblemError) as twice:
            client.feedback(str(result.prediction_id), "dandelion")
        assert twice.value.status == 409
        with pytest.raises(ApiProblemError) as unknown:
            client.feedback(uuid.uuid4().hex, "grass")  # well-formed, never served
        assert unknown.value.status == 404
        with pytest.raises(ApiProblemError) as malformed:
            client.feedback("no-such-prediction", "grass")
        assert malformed.value.status == 422
        other = client.predict("other.jpg", data)
        plain = client.feedback(str(other.prediction_id), "dandelion")  # JSON, no photo
        assert store.get_feedback(plain["feedback_id"]).image_key is None


def test_unknown_answer_and_neither_feedback(app_api: AppApi) -> None:
    photo = app_api.openset.unknown_photo  # an ood-dev object the model's detector rejects
    data = photo.read_bytes()
    store = app_api.feedback_store()
    with ApiClient(app_api.url) as client:
        result = client.predict(photo.name, data)
        assert result.ok and result.unknown and not result.uncertain
        assert (result.label, result.reason) == ("unknown", "out_of_domain")
        assert result.ood_score is not None
        assert result.ood_score > app_api.openset.detector.threshold
        assert [c for _, c in result.feedback_choices()] == ["dandelion", "grass", "neither"]
        body = client.feedback(str(result.prediction_id), "neither", image=data, filename="o.jpg")
        assert (body["correct_label"], body["agree"]) == ("neither", True)
        record = store.get_feedback(body["feedback_id"])
        assert record is not None and record.correct_label == "neither"
        assert record.image_key and record.image_key.startswith("feedback/neither/")
        with pytest.raises(DandelionError, match="must be one of dandelion, grass, neither"):
            client.feedback(str(result.prediction_id), "unknown")  # an answer, not a label


def test_api_down() -> None:
    url = dead_url()
    with ApiClient(url, timeout=2) as client:
        health = client.health()
        assert (health.ready, health.reachable, health.title) == (False, False, "API unavailable")
        assert url in health.reason
        with pytest.raises(ApiUnavailableError, match="cannot reach the API"):
            client.predict("a.jpg", b"data")
        with pytest.raises(ApiUnavailableError):
            client.model()
        with pytest.raises(ApiUnavailableError):
            client.feedback("p", "grass")
