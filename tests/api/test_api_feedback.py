"""Feedback: stored durably in SQLite (the running API) and PostgreSQL (a real server)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from api.app import create_app
from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data.feedback import (
    DuplicateFeedbackError,
    FeedbackStore,
    InvalidFeedbackError,
    PredictionRecord,
    UnknownPredictionError,
)
from dandelion_lib.data.review import ReviewQueue
from tests.api.conftest import MODEL_NAME, ApiServer, Registry

GRASS = "grass/00000011.jpg"
DANDELION = "dandelion/00000012.jpg"


def _predict(client: Any, image: bytes) -> dict[str, Any]:
    r = client.post("/predict", files={"file": ("photo.jpg", image, "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json()


def _metric(client: Any, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


# --- through the running API on its embedded SQLite database -----------------------------
def test_feedback_is_stored_in_sqlite_with_the_image(
    api_server: ApiServer, greenr_dir: Path
) -> None:
    image = (greenr_dir / DANDELION).read_bytes()
    with api_server.client() as c:
        pred = _predict(c, image)
        agree0 = _metric(c, 'dandelion_feedback_total{agreement="agree"}')
        disagree0 = _metric(c, 'dandelion_feedback_total{agreement="disagree"}')
        top = max(pred["probabilities"], key=pred["probabilities"].get)
        r = c.post(
            "/feedback",
            data={"prediction_id": pred["prediction_id"], "correct_label": "dandelion"},
            files={"image": ("photo.jpg", image, "image/jpeg")},
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["prediction_id"] == pred["prediction_id"]
        assert body["predicted_label"] == top
        assert body["agree"] == (top == "dandelion")
        assert body["model"] == pred["model"]
        # Counted, and the live accuracy gauge is set from the database.
        key = "agree" if body["agree"] else "disagree"
        after = _metric(c, f'dandelion_feedback_total{{agreement="{key}"}}')
        assert after == (agree0 if body["agree"] else disagree0) + 1
        assert 0.0 <= _metric(c, "dandelion_live_accuracy") <= 1.0

    # Read back independently from the server's SQLite file and object store.
    store = LocalStore(api_server.workdir / "store")
    db = FeedbackStore(f"sqlite:///{api_server.workdir / 'feedback.db'}", store=store)
    try:
        record = db.get_feedback(body["feedback_id"])
        assert record is not None
        assert (
            record.correct_label == "dandelion" and record.model_version == pred["model"]["version"]
        )
        assert record.image_key == body["image_key"]
        assert record.image_key.startswith("feedback/dandelion/") and record.image_key.endswith(
            ".jpg"
        )
        assert store.get_bytes(record.image_key) == image
        # The prediction log is written behind (bulk inserts every half second).
        deadline = time.monotonic() + 20
        while (prediction := db.get_prediction(pred["prediction_id"])) is None:
            assert time.monotonic() < deadline, "prediction never reached the database"
            time.sleep(0.2)
        assert prediction.top_label == top and prediction.image_sha256 == record.image_sha256
    finally:
        db.close()


def test_feedback_errors(api_server: ApiServer, greenr_dir: Path) -> None:
    image = (greenr_dir / GRASS).read_bytes()
    other = (greenr_dir / DANDELION).read_bytes()
    with api_server.client() as c:
        pid = _predict(c, image)["prediction_id"]
        cases = [
            (
                {"json": {"prediction_id": str(uuid.uuid4()), "correct_label": "grass"}},
                404,
                "unknown-prediction",
            ),
            (
                {"json": {"prediction_id": "not-a-uuid", "correct_label": "grass"}},
                422,
                "invalid-feedback",
            ),
            (
                {"json": {"prediction_id": pid, "correct_label": "uncertain"}},
                422,
                "invalid-feedback",
            ),
            ({"json": {"prediction_id": pid}}, 422, "invalid-feedback"),
            (
                {"json": {"prediction_id": pid, "correct_label": "grass", "x": 1}},
                422,
                "invalid-feedback",
            ),
            (
                {"content": b"{not json", "headers": {"content-type": "application/json"}},
                400,
                "invalid-json",
            ),
            (
                {"content": b"grass", "headers": {"content-type": "text/plain"}},
                415,
                "unsupported-media-type",
            ),
            (
                {
                    "data": {"prediction_id": pid, "correct_label": "grass"},
                    "files": {"image": ("other.jpg", other, "image/jpeg")},
                },
                422,
                "invalid-feedback",  # not the image that was predicted
            ),
        ]
        for kwargs, status, code in cases:
            r = c.post("/feedback", **kwargs)
            assert r.status_code == status, (kwargs.keys(), r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == code
        # Nothing was stored by the failures: the first valid feedback is accepted ...
        ok = c.post("/feedback", json={"prediction_id": pid, "correct_label": "grass"})
        assert ok.status_code == 201, ok.text
        assert ok.json()["image_key"] is None
        # ... and a second one for the same prediction is a conflict.
        again = c.post("/feedback", json={"prediction_id": pid, "correct_label": "dandelion"})
        assert again.status_code == 409 and again.json()["code"] == "duplicate-feedback"


# --- the store itself, on SQLite and on PostgreSQL ---------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def feedback_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeedbackStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'feedback.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    store = FeedbackStore(url, store=LocalStore(tmp_path / "store"))
    yield store
    store.close()


def _record(image: bytes | None = None, top: str = "grass") -> PredictionRecord:
    import hashlib

    return PredictionRecord(
        prediction_id=str(uuid.uuid4()),
        label=top,
        top_label=top,
        confidence=0.9,
        probabilities={"dandelion": 0.1, "grass": 0.9}
        if top == "grass"
        else {"dandelion": 0.9, "grass": 0.1},
        model_name="dandelion",
        model_version="3",
        image_sha256=hashlib.sha256(image).hexdigest() if image else None,
    )


def test_store_round_trip_review_and_accuracy(
    feedback_store: FeedbackStore, greenr_dir: Path
) -> None:
    image = (greenr_dir / GRASS).read_bytes()
    preds = [_record(image), _record(top="dandelion"), _record(top="grass")]
    assert feedback_store.record_predictions(preds) == 3
    assert feedback_store.record_predictions(preds[:1]) == 0  # idempotent
    assert feedback_store.get_prediction(preds[1].prediction_id) == _with_time(
        preds[1], feedback_store
    )

    f0 = feedback_store.add_feedback(preds[0].prediction_id, "grass", image)
    f1 = feedback_store.add_feedback(preds[1].prediction_id, "grass")
    assert (f0.agree, f1.agree) == (True, False)
    assert f0.image_key == f"feedback/grass/{preds[0].image_sha256}.jpg"
    assert (
        feedback_store.store is not None and feedback_store.store.get_bytes(f0.image_key) == image
    )
    assert feedback_store.recent_accuracy() == (0.5, 2)

    with pytest.raises(DuplicateFeedbackError):
        feedback_store.add_feedback(preds[0].prediction_id, "dandelion")
    with pytest.raises(UnknownPredictionError):
        feedback_store.add_feedback(str(uuid.uuid4()), "grass")
    with pytest.raises(InvalidFeedbackError):
        feedback_store.add_feedback(preds[2].prediction_id, "uncertain")
    with pytest.raises(InvalidFeedbackError):  # an image that is not an image: nothing written
        feedback_store.add_feedback(preds[2].prediction_id, "grass", b"<svg/>")
    assert list(feedback_store.store.list("feedback/")) == [f0.image_key]
    assert len(feedback_store.list_feedback()) == 2

    assert [r.feedback_id for r in feedback_store.list_feedback(reviewed=False)] == [
        f1.feedback_id,
        f0.feedback_id,
    ]
    ReviewQueue(feedback_store).review(f0.feedback_id, accepted=True)
    ReviewQueue(feedback_store).review(f1.feedback_id, accepted=False)
    accepted = feedback_store.accepted()
    assert [r.feedback_id for r in accepted] == [f0.feedback_id]
    assert accepted[0].reviewed_at is not None and accepted[0].accepted is True
    assert feedback_store.list_feedback(reviewed=False) == []


def _with_time(record: PredictionRecord, store: FeedbackStore) -> PredictionRecord:
    from dataclasses import replace

    stored = store.get_prediction(record.prediction_id)
    assert stored is not None and stored.created_at is not None
    return replace(record, created_at=stored.created_at)


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    from dandelion_lib.data.feedback import FeedbackUnavailableError
    from tests.conftest import free_port

    store = FeedbackStore(f"postgresql://nobody:secret@127.0.0.1:{free_port()}/nothing")
    with pytest.raises(FeedbackUnavailableError) as err:
        store.check()
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


# --- the API on PostgreSQL ---------------------------------------------------------------
def test_api_feedback_on_postgresql(
    api_server: ApiServer, registry: Registry, pg_url: str, tmp_path: Path, greenr_dir: Path
) -> None:
    """The same app, in-process, with its feedback database on the real PostgreSQL server."""
    settings = Settings(
        workdir=tmp_path / "work",
        tracking_uri=registry.tracking_uri,
        model_name=MODEL_NAME,
        feedback_db_url=pg_url,
        reload_interval_s=60,
    )
    image = (greenr_dir / GRASS).read_bytes()
    with TestClient(create_app(settings), timeout=60) as c:
        deadline = time.monotonic() + 120
        while c.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, c.get("/health/ready").text
            time.sleep(0.2)
        pred = _predict(c, image)
        r = c.post(
            "/feedback",
            data={"prediction_id": pred["prediction_id"], "correct_label": "grass"},
            files={"image": ("g.jpg", image, "image/jpeg")},
        )
        assert r.status_code == 201, r.text
        feedback_id = r.json()["feedback_id"]
    # Independently: the row is in PostgreSQL, the image in the app's store.
    import psycopg

    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT prediction_id, correct_label, model_version, image_key FROM feedback WHERE feedback_id = %s",
            (feedback_id,),
        ).fetchone()
        logged = conn.execute(
            "SELECT top_label, image_sha256 FROM predictions WHERE prediction_id = %s",
            (pred["prediction_id"],),
        ).fetchone()
    assert row is not None
    assert row[:3] == (pred["prediction_id"], "grass", pred["model"]["version"])
    assert LocalStore(tmp_path / "work" / "store").get_bytes(row[3]) == image
    assert logged is not None and logged[0] == max(
        pred["probabilities"], key=pred["probabilities"].get
    )


def test_feedback_answers_503_when_the_database_is_down(
    api_server: ApiServer, registry: Registry, tmp_path: Path, greenr_dir: Path
) -> None:
    """Predictions keep working; feedback says the database is unavailable (no 500)."""
    from tests.conftest import free_port

    settings = Settings(
        workdir=tmp_path / "work",
        tracking_uri=registry.tracking_uri,
        model_name=MODEL_NAME,
        feedback_db_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none",
        reload_interval_s=60,
    )
    with TestClient(create_app(settings), timeout=60) as c:
        deadline = time.monotonic() + 120
        while c.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        pred = _predict(c, (greenr_dir / GRASS).read_bytes())
        r = c.post(
            "/feedback", json={"prediction_id": pred["prediction_id"], "correct_label": "grass"}
        )
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "feedback-unavailable"
        assert "retry-after" in r.headers


def test_review_from_the_command_line(tmp_path: Path, greenr_dir: Path) -> None:
    """`dandelion feedback list / review / accepted` on the embedded SQLite database."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    workdir = tmp_path / "work"
    image = (greenr_dir / GRASS).read_bytes()
    store = FeedbackStore(
        f"sqlite:///{workdir / 'feedback.db'}", store=LocalStore(workdir / "store")
    )
    pred = _record(image)
    store.record_predictions([pred])
    record = store.add_feedback(pred.prediction_id, "grass", image)
    store.close()

    def dandelion(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DANDELION_")}
        env["DANDELION_WORKDIR"] = str(workdir)
        return subprocess.run(
            [sys.executable, "-m", "dandelion_lib.cli", "feedback", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    pending = dandelion("list", "--pending")
    assert pending.returncode == 0, pending.stderr
    assert record.feedback_id in pending.stdout and "pending" in pending.stdout
    assert dandelion("review", record.feedback_id, "--accept").returncode == 0
    accepted = dandelion("accepted", "--json")
    rows = [json.loads(line) for line in accepted.stdout.splitlines()]
    assert [(r["feedback_id"], r["image_key"], r["accepted"]) for r in rows] == [
        (record.feedback_id, record.image_key, True)
    ]
    missing = dandelion("review", "no-such-id", "--reject")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no feedback with id" in missing.stderr


def test_a_reviewers_second_look_is_not_counted_as_a_users_prediction(
    api_server: ApiServer, greenr_dir: Path
) -> None:
    """``purpose=review`` (the reviewer page's maps): the same answer, but no prediction
    counted, no drift sample and no prediction log row; a bad value is a 400 problem."""
    image = (greenr_dir / DANDELION).read_bytes()
    files = {"file": ("photo.jpg", image, "image/jpeg")}
    with api_server.client() as c:
        first = _predict(c, image)
        label = f'dandelion_predictions_total{{label="{first["label"]}"}}'
        counted, window = _metric(c, label), _metric(c, "dandelion_drift_window_images")
        reviews = _metric(c, "dandelion_review_predictions_total")
        r = c.post("/predict?purpose=review", files=files)
        assert r.status_code == 200, r.text
        review = r.json()
        assert review["label"] == first["label"]
        for name, p in first["probabilities"].items():
            assert review["probabilities"][name] == pytest.approx(p, abs=1e-6)
        assert _metric(c, label) == counted
        assert _metric(c, "dandelion_drift_window_images") == window
        assert _metric(c, "dandelion_review_predictions_total") == reviews + 1
        for value in ("REVIEW", "answer"):  # case-insensitive, and the default by name
            assert c.post("/predict", params={"purpose": value}, files=files).status_code == 200
        bad = c.post("/predict?purpose=audit", files=files)
        assert bad.status_code == 400
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert bad.json()["detail"] == "purpose must be answer or review, not 'audit'"
        after = _predict(c, image)  # logged after the review: the log is written in order

    db = FeedbackStore(
        f"sqlite:///{api_server.workdir / 'feedback.db'}",
        store=LocalStore(api_server.workdir / "store"),
    )
    try:
        deadline = time.monotonic() + 20
        while db.get_prediction(after["prediction_id"]) is None:
            assert time.monotonic() < deadline, "prediction never reached the database"
            time.sleep(0.2)
        assert db.get_prediction(first["prediction_id"]) is not None
        assert db.get_prediction(review["prediction_id"]) is None
    finally:
        db.close()
