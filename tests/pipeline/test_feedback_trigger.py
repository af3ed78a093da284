"""Accepted feedback starts retraining: ``airflow dags test dandelion_feedback`` (real Airflow,
a real SQLite feedback database, reference photos) emits the feedback asset once enough
accepted photos wait for a dataset version; rejected and pending ones do not count."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.data.feedback import FeedbackStore, PredictionRecord
from dandelion_lib.data.ingest import ingest
from dandelion_lib.data.review import ReviewQueue
from tests.pipeline.conftest import dags_test

# Slow: an ingest and a real `airflow dags test dandelion_feedback` (about 1 minute).
pytestmark = pytest.mark.slow


def _feedback(store: FeedbackStore, photos: list[Path], decisions: list[bool | None]) -> None:
    for n, (path, decision) in enumerate(zip(photos, decisions, strict=True)):
        pid = f"p{n}"
        store.record_predictions(
            [PredictionRecord(pid, "dandelion", "dandelion", 0.9, {"dandelion": 0.9, "grass": 0.1})]
        )
        record = store.add_feedback(pid, "grass", path.read_bytes())
        if decision is not None:
            ReviewQueue(store).review(record.feedback_id, accepted=decision)


def test_enough_accepted_feedback_emits_the_retraining_asset(
    tmp_path: Path,
    greenr_dir: Path,
    pipeline_env_factory: Callable[[Path], dict[str, str]],
) -> None:
    env = pipeline_env_factory(tmp_path)
    work = Path(env["DANDELION_WORKDIR"])
    src = tmp_path / "src"
    for label in ("dandelion", "grass"):
        (src / label).mkdir(parents=True)
        for path in sorted((greenr_dir / label).glob("*.jpg"))[:20]:
            shutil.copy(path, src / label / path.name)
    settings = Settings(workdir=work)
    ingest(settings, source=str(src), progress=False)

    others = sorted((greenr_dir / "grass").glob("*.jpg"))[100:105]
    feedback = FeedbackStore.from_settings(settings)
    # two accepted (they wait for a dataset version), one rejected, two pending
    _feedback(feedback, others, [True, True, False, None, None])
    assert ReviewQueue(feedback).awaiting_dataset().count == 2
    feedback.close()

    env["DANDELION_RETRAIN_FEEDBACK_THRESHOLD"] = "2"
    proc = dags_test("dandelion_feedback", env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    db = work / "airflow" / "airflow.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        states = dict(
            conn.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = 'dandelion_feedback'"
            ).fetchall()
        )
        events = conn.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE a.uri = 'dandelion://feedback/accepted'"
        ).fetchall()
    assert states == {"feedback_waiting": "success", "announce_feedback": "success"}
    assert [json.loads(e[0]) for e in events] == [{"accepted_waiting": 2}]
