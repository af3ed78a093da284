"""Faults of the API's dependencies, on real processes: the feedback database locked, stopped
and restarted (SQLite and PostgreSQL), the model registry hanging or down at start and back.

Each test runs ``python -m api`` of its own with short deadlines, injects the fault into a
real dependency (a lock held on the real SQLite file, the real PostgreSQL server stopped, a
TCP proxy in front of the real MLflow server that stops answering) and asserts the answers
(503 with ``Retry-After`` on the dependency's endpoints only, predictions unaffected) and
that nothing was lost. The client timeouts are what a client would wait: the API must answer
within them, not merely eventually.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN_TOKEN, PgServer, Registry, api_env, start_api, stop_api
from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.faults

GRASS = "grass/00000000.jpg"
CLIENT_WAIT_S = 20.0
"""How long a client waits for an answer; every answer here must come sooner."""


@dataclass
class Api:
    url: str
    proc: Any
    workdir: Path

    def predict(self, image: bytes, timeout: float = CLIENT_WAIT_S) -> httpx.Response:
        return httpx.post(
            f"{self.url}/predict",
            content=image,
            headers={"content-type": "image/jpeg"},
            timeout=timeout,
        )

    def feedback(self, prediction_id: str, label: str = "grass") -> httpx.Response:
        return httpx.post(
            f"{self.url}/feedback",
            json={"prediction_id": prediction_id, "correct_label": label},
            timeout=CLIENT_WAIT_S,
        )

    def reload(self) -> httpx.Response:
        return httpx.post(
            f"{self.url}/admin/reload",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=CLIENT_WAIT_S,
        )

    def model(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/model", timeout=CLIENT_WAIT_S).json()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/health/ready", timeout=CLIENT_WAIT_S).status_code != 200:
            assert self.proc.poll() is None, "the API exited"
            assert time.monotonic() < deadline, f"the API never became ready: {self.model()}"
            time.sleep(0.3)


@contextlib.contextmanager
def api_process(
    tmp_path: Path, tracking_uri: str, *, ready: bool = True, **overrides: str
) -> Iterator[Api]:
    workdir = tmp_path / "api"
    workdir.mkdir()
    port = free_port()
    env = api_env(workdir, port, tracking_uri, **overrides)
    proc = start_api(env, workdir / "server.log")
    api = Api(f"http://127.0.0.1:{port}", proc, workdir)
    try:
        wait_http(f"{api.url}/health/live", timeout=180, proc=proc)
        if ready:
            api.wait_ready()
        yield api
    finally:
        stop_api(proc)


def rows(db: Path, table: str) -> set[str]:
    """The prediction ids in a table of the SQLite feedback database."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {r[0] for r in conn.execute(f"SELECT prediction_id FROM {table}")}


def codes_count(answers: list[httpx.Response], code: str) -> int:
    return sum(1 for r in answers if r.json().get("code") == code)


def wait_for(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def sqlite_api(
    registry: Registry, champion: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """The API on the embedded SQLite feedback database, with a 2 s feedback deadline."""
    with api_process(
        tmp_path_factory.mktemp("faults"),
        registry.tracking_uri,
        DANDELION_FEEDBACK_TIMEOUT_S="2",
        DANDELION_FEEDBACK_CONCURRENCY="4",
    ) as api:
        yield api


# --- the feedback database ------------------------------------------------------------------
def test_a_locked_feedback_database_never_stalls_predictions(
    sqlite_api: Api, greenr_dir: Path
) -> None:
    """48 feedback requests against a locked SQLite database: each answers 503 + Retry-After
    within the client's wait, a prediction meanwhile answers 200, and once the lock is gone
    every feedback is stored exactly once and every prediction is in the database."""
    image = (greenr_dir / GRASS).read_bytes()
    api = sqlite_api
    ids = []
    for _ in range(48):
        r = api.predict(image)
        assert r.status_code == 200, r.text
        ids.append(r.json()["prediction_id"])
    db = api.workdir / "feedback.db"
    wait_for(lambda: set(ids) <= rows(db, "predictions"))

    lock = sqlite3.connect(db, isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")  # holds the write lock until released below
    try:
        barrier = threading.Barrier(len(ids) + 1)

        def send(prediction_id: str) -> httpx.Response:
            barrier.wait()
            return api.feedback(prediction_id)

        with cf.ThreadPoolExecutor(len(ids)) as pool:
            futures = [pool.submit(send, i) for i in ids]
            barrier.wait()
            time.sleep(0.2)  # the feedback requests are in
            predicted = api.predict(image)
            answers = [f.result() for f in futures]
        metrics = httpx.get(f"{api.url}/metrics", timeout=CLIENT_WAIT_S).text
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    assert predicted.status_code == 200, predicted.text
    codes = {r.json()["code"] for r in answers}
    assert {r.status_code for r in answers} == {503}, codes
    assert codes <= {"feedback-busy", "feedback-timeout", "feedback-unavailable"}, codes
    assert "feedback-busy" in codes  # the bulkhead refused what it could not run
    assert all(int(r.headers["retry-after"]) > 0 for r in answers)
    busy = 'dandelion_dependency_failures_total{dependency="feedback",reason="busy"} '
    counted = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(busy)]
    assert counted and counted[0] == codes_count(answers, "feedback-busy")

    # The lock is gone: sent again, every feedback is stored (or was, late: 409).
    again = [api.feedback(i) for i in ids]
    assert {r.status_code for r in again} <= {201, 409}, [r.text for r in again]
    extra = api.predict(image).json()["prediction_id"]
    wait_for(lambda: {*ids, extra} <= rows(db, "predictions"))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        stored = [r[0] for r in conn.execute("SELECT prediction_id FROM feedback")]
    assert sorted(stored) == sorted(ids)


def test_a_broken_version_promoted_under_traffic_fails_no_request(
    sqlite_api: Api, registry: Registry, champion: str, greenr_dir: Path
) -> None:
    """The alias moves to a version that cannot load while clients predict: every request
    answers 200 from the version already served, which keeps serving."""
    image = (greenr_dir / GRASS).read_bytes()
    api = sqlite_api
    statuses: list[int] = []
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            statuses.append(api.predict(image).status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        broken = registry.register_broken()
        registry.set_alias(broken)
        wait_for(lambda: (api.model().get("last_failure") or {}).get("version") == broken, 120)
        statuses_at_failure = len(statuses)
        wait_for(lambda: len(statuses) > statuses_at_failure + 5)
    finally:
        done.set()
        thread.join()
        registry.set_alias(champion)
    assert statuses and set(statuses) == {200}, statuses
    assert api.model()["version"] == champion


def test_postgresql_stopped_and_restarted_loses_nothing(
    registry: Registry, champion: str, tmp_path: Path, greenr_dir: Path
) -> None:
    """PostgreSQL stops under traffic: predictions keep answering 200, feedback 503 with
    Retry-After; after the restart every prediction and every feedback is in the database."""
    import psycopg

    image = (greenr_dir / GRASS).read_bytes()
    pg = PgServer()
    try:
        with api_process(
            tmp_path,
            registry.tracking_uri,
            DANDELION_FEEDBACK_DB_URL=pg.url,
            DANDELION_FEEDBACK_TIMEOUT_S="2",
        ) as api:
            before = [api.predict(image).json()["prediction_id"] for _ in range(6)]
            assert [api.feedback(i).status_code for i in before[:3]] == [201] * 3

            pg.stop()
            during = []
            for _ in range(6):
                r = api.predict(image)
                assert r.status_code == 200, r.text
                during.append(r.json()["prediction_id"])
            refused = [api.feedback(i) for i in during[:3]]
            for r in refused:
                assert r.status_code == 503, r.text
                assert r.json()["code"].startswith("feedback-")
                assert int(r.headers["retry-after"]) > 0

            pg.start()
            pending = list(during[:3])

            def stored_again() -> bool:
                for i in list(pending):
                    if api.feedback(i).status_code in (201, 409):
                        pending.remove(i)
                return not pending

            wait_for(stored_again)

            def predictions_in_db() -> set[str]:
                with psycopg.connect(pg.url) as conn:
                    return {r[0] for r in conn.execute("SELECT prediction_id FROM predictions")}

            wait_for(lambda: {*before, *during} <= predictions_in_db())
        with psycopg.connect(pg.url) as conn:
            stored = sorted(r[0] for r in conn.execute("SELECT prediction_id FROM feedback"))
        assert stored == sorted([*before[:3], *during[:3]])
    finally:
        pg.remove()


# --- the model registry ---------------------------------------------------------------------
class HangingProxy:
    """A TCP proxy in front of a real server that can stop answering (a hung dependency):
    in ``hang`` mode it accepts connections and swallows what it receives, like a server
    that is up but stuck; in ``pass`` mode it forwards both ways."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.mode = "pass"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            upstream = None
            if self.mode == "pass":
                with contextlib.suppress(OSError):
                    upstream = socket.create_connection(self.target, timeout=10)
                    upstream.settimeout(None)
                    self._sockets.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if dst is not None and self.mode == "pass":
                    dst.sendall(data)
                # in "hang" mode nothing goes through: the peer waits for an answer
        with contextlib.suppress(OSError):
            if dst is not None and self.mode == "pass":
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def test_a_hanging_registry_is_named_fast_and_never_holds_reload_or_shutdown(
    registry: Registry, champion: str, tmp_path: Path, greenr_dir: Path
) -> None:
    """The registry hangs at start: readiness names it within the client's wait, reload
    answers 503 within its deadline; the registry comes back: the champion is loaded; it
    hangs again: predictions go on, and shutdown is not held by a reload in flight."""
    image = (greenr_dir / GRASS).read_bytes()
    proxy = HangingProxy(registry.tracking_uri)
    proxy.mode = "hang"
    try:
        with api_process(
            tmp_path,
            proxy.url,
            ready=False,
            DANDELION_REGISTRY_TIMEOUT_S="2",
            DANDELION_REGISTRY_RETRIES="0",
            DANDELION_RELOAD_TIMEOUT_S="1",
        ) as api:
            wait_for(lambda: api.model()["state"] != "starting", timeout=CLIENT_WAIT_S * 3)
            info = api.model()
            assert info["state"] == "waiting", info
            assert f"127.0.0.1:{proxy.port}" in info["reason"], info
            ready = httpx.get(f"{api.url}/health/ready", timeout=CLIENT_WAIT_S)
            assert ready.status_code == 503
            assert "unavailable" in ready.json()["reason"]

            reload = api.reload()
            assert reload.status_code == 503, reload.text
            assert reload.json()["code"] in {"reload-timeout", "reload-busy"}
            assert int(reload.headers["retry-after"]) > 0

            proxy.mode = "pass"  # the registry is back: the poller loads the champion
            api.wait_ready()
            assert api.model()["version"] == champion

            proxy.mode = "hang"
            with cf.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(api.reload)
                assert api.predict(image).status_code == 200
                assert pending.result().status_code == 503
                pending = pool.submit(api.reload)
                time.sleep(0.3)  # the reload is in flight
                api.proc.send_signal(signal.SIGINT)
                api.proc.wait(timeout=CLIENT_WAIT_S)  # raises if shutdown is held
                with contextlib.suppress(httpx.HTTPError):
                    pending.result()
    finally:
        proxy.close()
