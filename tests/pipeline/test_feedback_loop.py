"""The feedback loop end to end, on real components: serve -> feedback -> review -> next
dataset version -> retrain -> gate -> hot reload.

One champion is trained for the module: a subset of the reference photos ingested and
trained by ``airflow dags test dandelion_pipeline`` (real Airflow on SQLite, the real
notebooks, MLflow on SQLite, the store a local folder), without augmented views to keep
it short. A real API process (``python -m api``) serves it and takes
the feedback into the same store and feedback database.

* :func:`test_reviewed_feedback_becomes_data_and_a_gated_model` sends the photos the
  champion answers worst (chosen by the API's own answers on photos outside the dataset) as
  feedback, accepts all but one, rejects one, runs ``dandelion_feedback`` and
  ``dandelion_retrain``, and checks the new dataset version, the feature store, the gate's
  two test splits and the API's hot reload, whichever way the gate decided.
* :func:`test_unreviewed_wrong_feedback_changes_nothing`: 50 wrong-label feedback items
  that nobody reviews start no retraining and change no dataset, model or alias.

The unreviewed round runs first (the loop's test asks for its fixture), so it sees the
first champion and its dataset whatever the loop's gate decides later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient

from dandelion_lib.core.config import Settings
from dandelion_lib.core.images import accept_image, canonical_image
from dandelion_lib.core.storage import LocalStore, sha256_hex
from dandelion_lib.data import dataset
from dandelion_lib.data.featurestore import PREFIX as FEATURES_PREFIX
from dandelion_lib.data.featurestore import FeatureStore
from dandelion_lib.data.feedback import FeedbackRecord, FeedbackStore
from dandelion_lib.data.review import ReviewQueue
from tests.api.conftest import ADMIN_TOKEN, api_env, start_api, stop_api
from tests.conftest import free_port, wait_http
from tests.pipeline.conftest import dags_test

pytestmark = pytest.mark.slow

LABELS = ("dandelion", "grass")
MODEL = "dandelion"
PER_CLASS = 40
"""Reference photos per class in the first dataset version."""
POOL_PER_CLASS = 20
"""Other photos per class the champion answers, to pick the hard ones from."""
PICKED = 6
"""Photos sent as feedback in the loop: all accepted but one, which is rejected."""
UNREVIEWED = 50
"""Wrong-label feedback items nobody reviews."""
CONF = {"notebook_params": {"train": {"augment_copies": 0}}}
"""Training kept short: no augmented views, so each photo has one embedding (view ``none``)
in the feature store and the counts below are exact."""
FEEDBACK_ASSET_URI = "dandelion://feedback/accepted"


def stored_sha256(path: Path) -> str:
    """The sha256 an image is stored and indexed under (its canonical bytes)."""
    data = path.read_bytes()
    return sha256_hex(canonical_image(data, accept_image(data)).data)


@dataclass
class World:
    """One embedded Airflow + work dir (store, MLflow, feedback DB) and the spare photos."""

    root: Path
    env: dict[str, str]
    settings: Settings
    store: LocalStore
    client: MlflowClient
    spare: dict[str, list[Path]] = field(default_factory=dict)
    """Reference photos outside the first dataset version (by content), per true label."""

    def dag(self, dag_id: str, **env: str) -> subprocess.CompletedProcess[str]:
        return dags_test(dag_id, {**self.env, **env}, CONF, cwd=self.root, timeout=900)

    def latest_summary(self) -> dict[str, Any]:
        latest = self.store.get_json("runs/latest")
        key = latest["run_id"].replace(":", "_").replace("+", "_")
        summary: dict[str, Any] = self.store.get_json(f"runs/{key}/summary.json")
        return summary

    def alias(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(MODEL, alias).version)
        except Exception:
            return None

    def model_versions(self) -> set[str]:
        return {str(mv.version) for mv in self.client.search_model_versions(f"name = '{MODEL}'")}

    def feedback(self) -> FeedbackStore:
        return FeedbackStore.from_settings(self.settings)

    def feature_pairs(self) -> dict[str, set[tuple[str, str]]]:
        """Every indexed (image sha256, view) of the feature store, per feature key."""
        keys = {k.split("/")[1] for k in self.store.list(f"{FEATURES_PREFIX}/")}
        return {key: set(FeatureStore(self.store, key).index()) for key in keys}

    def _db(self) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(Path(self.env["AIRFLOW_HOME"]) / "airflow.db"))

    def feedback_events(self) -> list[dict[str, Any]]:
        """The feedback asset's events (their ``extra``), oldest first."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                "WHERE a.uri = ? ORDER BY e.id",
                (FEEDBACK_ASSET_URI,),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def last_run_states(self, dag_id: str) -> dict[str, str]:
        """Task states of the DAG's latest run."""
        with self._db() as conn:
            (run_id,) = conn.execute(
                "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)
            ).fetchone()
            rows = conn.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                (dag_id, run_id),
            ).fetchall()
        return dict(rows)


@dataclass
class Api:
    """The real API process serving ``dandelion@champion`` from the world's registry."""

    url: str
    log_path: Path

    def predict(self, photos: list[Path]) -> list[dict[str, Any]]:
        """The API's answers (``/predict/batch``, 16 photos a request), in order."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(photos), 16):
            chunk = photos[start : start + 16]
            files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk]
            r = httpx.post(f"{self.url}/predict/batch", files=files, timeout=120)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["failed"] == 0, body
            out += [item["prediction"] for item in body["results"]]
        return out

    def send_feedback(self, prediction: dict[str, Any], label: str, photo: Path) -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/feedback",
            data={"prediction_id": prediction["prediction_id"], "correct_label": label},
            files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    def model(self) -> dict[str, Any]:
        info: dict[str, Any] = httpx.get(f"{self.url}/model", timeout=30).json()
        return info

    def reload(self) -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/admin/reload",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env_factory: Callable[[Path], dict[str, str]],
    greenr_dir: Path,
) -> World:
    """The first champion: ``PER_CLASS`` photos per class through ``dandelion_pipeline``."""
    root = tmp_path_factory.mktemp("loop")
    src = root / "src"
    spare: dict[str, list[Path]] = {}
    for label in LABELS:
        (src / label).mkdir(parents=True)
        photos = sorted((greenr_dir / label).glob("*.jpg"))
        for path in photos[:PER_CLASS]:
            shutil.copy(path, src / label / path.name)
        spare[label] = photos[PER_CLASS:]
    env = pipeline_env_factory(root)
    env.update(
        {
            "DANDELION_SOURCE": str(src),
            "DANDELION_MIN_IMAGES_PER_CLASS": "10",
            # the first version's test split is small (12 photos): the floor of test_e2e
            "DANDELION_PROMOTION_FLOOR": "0.8",
        }
    )
    work = Path(env["DANDELION_WORKDIR"])
    settings = Settings(workdir=work, promotion_floor=0.8)
    uri = settings.resolved_tracking_uri
    # Both URIs explicit: other tests in the same process may have set global ones.
    world = World(
        root, env, settings, LocalStore(work / "store"), MlflowClient(uri, registry_uri=uri)
    )

    proc = world.dag("dandelion_pipeline")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert world.alias("champion") is not None, "the first run promoted no champion"

    # Spare photos: none whose content is already in the dataset, none twice.
    known = set(dataset.load_manifest(world.store)["sha256"].astype(str))
    for label in LABELS:
        for path in spare[label]:
            sha = stored_sha256(path)
            if sha not in known:
                known.add(sha)
                world.spare.setdefault(label, []).append(path)
    return world


@pytest.fixture(scope="module")
def api(world: World) -> Iterator[Api]:
    """``python -m api`` on the world's work dir; reloads only when asked (``/admin/reload``),
    so what it serves changes exactly when the test says."""
    port = free_port()
    env = api_env(
        world.settings.workdir_path,
        port,
        world.settings.resolved_tracking_uri,
        DANDELION_MODEL_NAME=MODEL,
        DANDELION_RELOAD_INTERVAL_S="3600",
    )
    log_path = world.root / "api.log"
    proc = start_api(env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health/live", timeout=120, proc=proc)
        server = Api(url, log_path)
        champion = world.alias("champion")
        deadline = time.monotonic() + 180
        while server.model()["version"] != champion:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"champion never loaded: {server.model()}"
            time.sleep(0.5)
        yield server
    finally:
        stop_api(proc)


@dataclass
class Snapshot:
    """What a feedback round may change: dataset versions, model versions, the champion."""

    versions: list[str]
    latest: str
    models: set[str]
    champion: str | None

    @classmethod
    def of(cls, world: World) -> Snapshot:
        return cls(
            dataset.list_versions(world.store),
            dataset.latest_version(world.store),
            world.model_versions(),
            world.alias("champion"),
        )


@dataclass
class UnreviewedRound:
    before: Snapshot
    after: Snapshot
    feedback: list[FeedbackRecord]
    pending: int
    awaiting: int
    feedback_dag: subprocess.CompletedProcess[str]
    feedback_states: dict[str, str]
    events: list[dict[str, Any]]
    retrain: subprocess.CompletedProcess[str]
    summary: dict[str, Any]
    served: dict[str, Any]


@pytest.fixture(scope="module")
def unreviewed_round(world: World, api: Api) -> UnreviewedRound:
    """50 photos predicted by the API, each sent back with the wrong label and its image;
    nobody reviews them; the feedback watcher (threshold 1) and the retraining DAG run."""
    before = Snapshot.of(world)
    half = UNREVIEWED // 2
    # The last spare photos of each class (the loop picks from the first ones).
    photos = [(p, label) for label in LABELS for p in world.spare[label][-half:]]
    answers = api.predict([p for p, _ in photos])
    ids = []
    for (photo, label), answer in zip(photos, answers, strict=True):
        wrong = next(other for other in LABELS if other != label)
        ids.append(api.send_feedback(answer, wrong, photo)["feedback_id"])
    store = world.feedback()
    try:
        records = [store.get_feedback(i) for i in ids]
        queue = ReviewQueue(store)
        pending, awaiting = queue.count_pending(), queue.awaiting_dataset().count
    finally:
        store.close()
    feedback_dag = world.dag("dandelion_feedback", DANDELION_RETRAIN_FEEDBACK_THRESHOLD="1")
    states = world.last_run_states("dandelion_feedback")
    events = world.feedback_events()
    retrain = world.dag("dandelion_retrain")
    return UnreviewedRound(
        before=before,
        after=Snapshot.of(world),
        feedback=[r for r in records if r is not None],
        pending=pending,
        awaiting=awaiting,
        feedback_dag=feedback_dag,
        feedback_states=states,
        events=events,
        retrain=retrain,
        summary=world.latest_summary(),
        served=api.model(),
    )


def test_unreviewed_wrong_feedback_changes_nothing(
    world: World, unreviewed_round: UnreviewedRound
) -> None:
    r = unreviewed_round
    assert len(r.feedback) == UNREVIEWED
    assert all(f.image_key and f.accepted is None and f.reviewed_at is None for f in r.feedback)
    assert r.pending == UNREVIEWED and r.awaiting == 0
    # The watcher found nothing to announce, even with a threshold of one.
    assert r.feedback_dag.returncode == 0, (r.feedback_dag.stdout + r.feedback_dag.stderr)[-3000:]
    assert r.feedback_states == {"feedback_waiting": "success", "announce_feedback": "skipped"}
    assert r.events == []
    # A retraining run (as the weekly schedule starts it): nothing new, nothing trained.
    assert r.retrain.returncode == 0, (r.retrain.stdout + r.retrain.stderr)[-5000:]
    assert r.summary["dag_id"] == "dandelion_retrain" and r.summary["status"] == "succeeded"
    assert r.summary["dataset_version"] == r.before.latest
    assert r.summary["training"]["train"] is False, r.summary["training"]
    assert r.summary["task_states"]["train"] == "skipped"
    assert r.after == r.before
    assert r.served["version"] == r.before.champion
    # Still waiting for a reviewer, still out of every dataset version.
    sources = set(dataset.load_manifest(world.store)["source"].astype(str))
    assert not any(f"feedback:{f.feedback_id}" in sources for f in r.feedback)


def _as_utc(value: Any) -> dt.datetime:
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def test_reviewed_feedback_becomes_data_and_a_gated_model(
    world: World, api: Api, unreviewed_round: UnreviewedRound
) -> None:
    champion = world.alias("champion")
    assert champion is not None and api.model()["version"] == champion

    # -- 1. the champion answers photos outside its dataset; the worst answered are picked --
    pool = [(p, label) for label in LABELS for p in world.spare[label][:POOL_PER_CLASS]]
    answers = api.predict([p for p, _ in pool])
    assert {a["model"]["version"] for a in answers} == {champion}
    ranked = sorted(
        zip(pool, answers, strict=True),
        key=lambda item: (item[1]["probabilities"][item[0][1]], item[0][0].name),
    )
    picked = ranked[:PICKED]  # the lowest probabilities of the true label: wrong or unsure

    # -- 2. feedback through the API, with the photo and its true label --
    sent = []
    for (photo, label), answer in picked:
        body = api.send_feedback(answer, label, photo)
        assert body["model"]["version"] == champion
        top = max(answer["probabilities"], key=answer["probabilities"].get)
        assert body["agree"] == (top == label)
        sent.append((body["feedback_id"], photo, label))

    # -- 3. review: all accepted but one, which is rejected --
    accepted, rejected = sent[:-1], sent[-1]
    store = world.feedback()
    try:
        queue = ReviewQueue(store)
        queue.review_many([fid for fid, _, _ in accepted], accepted=True)
        queue.review(rejected[0], accepted=False)
        records = {fid: store.get_feedback(fid) for fid, _, _ in sent}
        assert queue.awaiting_dataset().count == len(accepted)
    finally:
        store.close()
    accepted_sha = {stored_sha256(photo): (fid, label) for fid, photo, label in accepted}
    rejected_sha = stored_sha256(rejected[1])
    assert len(accepted_sha) == len(accepted) and rejected_sha not in accepted_sha

    # -- 4. the feedback watcher announces them --
    events_before = world.feedback_events()
    proc = world.dag("dandelion_feedback", DANDELION_RETRAIN_FEEDBACK_THRESHOLD=str(len(accepted)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert world.last_run_states("dandelion_feedback") == {
        "feedback_waiting": "success",
        "announce_feedback": "success",
    }
    assert world.feedback_events() == [*events_before, {"accepted_waiting": len(accepted)}]

    # -- 5. retraining: a new dataset version from the accepted feedback, train, gate --
    before = Snapshot.of(world)
    previous = dataset.load_manifest(world.store, before.latest)
    features_before = world.feature_pairs()
    champion_run_id = world.client.get_model_version(MODEL, champion).run_id
    assert champion_run_id
    champion_run = world.client.get_run(champion_run_id)
    proc = world.dag("dandelion_retrain")
    log = (proc.stdout + proc.stderr)[-6000:]
    summary = world.latest_summary()
    assert summary["dag_id"] == "dandelion_retrain", log
    assert summary["training"]["train"] is True, summary["training"]
    promoted = bool(summary["promotion"] and summary["promotion"]["promoted"])
    if promoted:
        assert proc.returncode == 0 and summary["status"] == "succeeded", log
    else:  # a rejected challenger fails the run at its gate, and only there
        assert proc.returncode != 0, log
        failed = {t for t, s in summary["task_states"].items() if s == "failed"}
        assert failed == {"promote"}, (summary["task_states"], log)

    # -- 6. the new version: the previous one plus exactly the accepted photos --
    after = Snapshot.of(world)
    new_version = summary["dataset_version"]
    assert after.latest == new_version != before.latest
    assert after.versions == sorted([*before.versions, new_version])
    manifest = dataset.load_manifest(world.store, new_version)
    old_sha = set(previous["sha256"].astype(str))
    assert set(manifest["sha256"].astype(str)) == old_sha | set(accepted_sha)
    assert len(manifest) == len(previous) + len(accepted)
    assert rejected_sha not in set(manifest["sha256"].astype(str))
    kept = previous.set_index("sha256")["split"]
    now = manifest.set_index("sha256")
    assert (now.loc[kept.index, "split"] == kept).all(), "an earlier image changed its split"
    for sha, (fid, label) in accepted_sha.items():
        assert now.loc[sha, "source"] == f"feedback:{fid}"
        assert now.loc[sha, "label"] == label
    unreviewed = {f"feedback:{f.feedback_id}" for f in unreviewed_round.feedback}
    assert not unreviewed & set(manifest["source"].astype(str))
    report = dataset.load_report(world.store, new_version)
    # The version's report lists the feedback provenance: feedback id, the model version that
    # answered, the reviewer's decision time.
    provenance = {str(item["feedback_id"]): item for item in report["feedback"]}
    assert set(provenance) == {fid for fid, _ in accepted_sha.values()}
    for fid, item in provenance.items():
        record = records[fid]
        assert record is not None and record.reviewed_at is not None
        assert str(item["model_version"]) == champion == record.model_version
        decided = _as_utc(item["reviewed_at"]) - _as_utc(record.reviewed_at)
        assert abs(decided.total_seconds()) < 1.0, (item, record)
        assert (item["sha256"], item["label"]) == (
            next(s for s, (f, _) in accepted_sha.items() if f == fid),
            accepted_sha[item["sha256"]][1],
        )

    # -- 7. trained from cached embeddings plus those of the new photos only --
    model_version = summary["model"]["version"]
    assert summary["model"]["trained_in_this_run"] is True
    assert after.models == before.models | {model_version}
    train_run = world.client.get_run(summary["model"]["mlflow_run_id"])
    assert train_run.data.tags["dandelion.dataset_version"] == new_version
    cached = train_run.data.metrics["features_cached"]
    computed = train_run.data.metrics["features_computed"]
    # every earlier photo's embedding read from the store; each photo's embedding used once
    # (wherever the new ones were computed: in this task or by an extraction step before it)
    assert cached >= len(previous) > 0
    assert cached + computed == len(manifest)
    # the mapped extract_features tasks (with the train notebook's parameters: no augmented
    # views here) computed exactly the new photos' embeddings, so train read every one
    assert summary["features"]["features_computed"] == len(accepted_sha)
    assert summary["features"]["images"] == len(manifest) and computed == 0
    key = train_run.data.params["feature_store_key"]
    assert key == champion_run.data.params["feature_store_key"], "the feature key changed"
    features_after = world.feature_pairs()
    assert set(features_after) == set(features_before)
    old_pairs = features_before[key]
    new_pairs = features_after[key] - old_pairs
    assert old_pairs <= features_after[key]
    assert {sha for sha, _view in new_pairs} == set(accepted_sha)

    # -- 8. the gate decided on the new test split and on the frozen benchmark --
    mv = world.client.get_model_version(MODEL, model_version)
    tags = mv.tags
    benchmark = world.store.get_json("datasets/benchmark")["version"]
    assert benchmark == before.versions[0]
    assert tags["promotion.decision"] == ("promoted" if promoted else "rejected")
    assert tags["promotion.dataset_version"] == new_version
    assert tags["promotion.champion_version"] == champion
    assert int(tags["promotion.test_images"]) == int((manifest["split"] == "test").sum())
    assert tags["promotion.benchmark_dataset_version"] == benchmark
    for side in ("challenger", "champion"):
        assert 0.0 <= float(tags[f"promotion.{side}_accuracy"]) <= 1.0
        assert 0.0 <= float(tags[f"promotion.{side}_benchmark_accuracy"]) <= 1.0
    gate_run = world.client.get_run(tags["promotion.run_id"])
    metrics = gate_run.data.metrics
    assert gate_run.data.tags["benchmark_dataset_version"] == benchmark
    assert metrics["test_accuracy"] == pytest.approx(float(tags["promotion.challenger_accuracy"]))
    assert metrics["benchmark_test_accuracy"] == pytest.approx(
        float(tags["promotion.challenger_benchmark_accuracy"])
    )
    assert metrics["champion_test_accuracy"] == pytest.approx(
        float(tags["promotion.champion_accuracy"])
    )
    assert metrics["champion_benchmark_test_accuracy"] == pytest.approx(
        float(tags["promotion.champion_benchmark_accuracy"])
    )

    # -- 9. hot reload: the API serves whatever the registry's champion now is --
    assert api.model()["version"] == champion  # nothing reloads on its own here
    reloaded = api.reload()
    served = api.model()
    photo = world.spare[LABELS[0]][0]
    answer = api.predict([photo])[0]
    if promoted:
        assert after.champion == model_version != champion
        assert reloaded["action"] == "loaded" and reloaded["version"] == model_version
        assert served["version"] == model_version
        assert served["dataset_version"] == new_version
        assert answer["model"]["version"] == model_version
    else:
        assert after.champion == champion
        assert tags["promotion.reason"], "a rejection says why"
        assert summary["promotion"]["reason"] == tags["promotion.reason"]
        assert reloaded["action"] == "unchanged" and reloaded["version"] == champion
        assert served["version"] == champion
        assert answer["model"]["version"] == champion
