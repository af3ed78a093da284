"""Hot reload on alias moves (under traffic), broken versions, and the admin endpoint.

The tests run in file order: a new version is swapped in, then a broken one is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from api.app import create_app
from dandelion_lib.core.config import Settings
from tests.api.conftest import ADMIN_TOKEN, MODEL_NAME, ApiServer

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def test_admin_reload_needs_the_bearer_token(api_server: ApiServer) -> None:
    with api_server.client() as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": ADMIN_TOKEN}):
            r = c.post("/admin/reload", headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["code"] == "unauthorized"
        ok = c.post("/admin/reload", headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert ok.json()["action"] == "unchanged"
    assert ok.json()["model"]["version"] == api_server.model()["version"]


def test_admin_is_refused_when_no_token_is_configured(tmp_path: Path) -> None:
    app = create_app(Settings(workdir=tmp_path, admin_token=None))
    c = TestClient(app)  # no lifespan, no model: refused before anything happens
    r = c.post("/admin/reload", headers=AUTH)
    assert r.status_code == 403
    assert r.json()["code"] == "admin-disabled"


class Traffic:
    """Clients sending predictions in a loop; records every answer per client."""

    def __init__(self, server: ApiServer, image: bytes, clients: int = 3):
        self.server, self.image = server, image
        self.stop = threading.Event()
        self.answers: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in range(clients)]
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def _run(self, i: int) -> None:
        with self.server.client() as c:
            while not self.stop.is_set() and len(self.answers[i]) < 2000:
                r = c.post("/predict", content=self.image, headers={"content-type": "image/jpeg"})
                self.answers[i].append((r.status_code, r.json()))

    def wait(self, condition: Callable[[list[tuple[int, dict[str, Any]]]], bool]) -> None:
        """Until every client's answers so far satisfy ``condition`` (60 s at most)."""
        deadline = time.monotonic() + 60
        while not all(condition(list(a)) for a in self.answers):
            assert time.monotonic() < deadline, [len(a) for a in self.answers]
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_hot_reload_on_alias_move_fails_no_request(api_server: ApiServer, greenr_dir: Path) -> None:
    registry = api_server.registry
    old = api_server.model()["version"]
    new = registry.register(scale=0.5)  # different weights: different probabilities
    image = (greenr_dir / "dandelion" / "00000020.jpg").read_bytes()
    with Traffic(api_server, image) as traffic:
        traffic.wait(lambda answers: len(answers) >= 3)
        registry.set_alias(new)  # the server polls the alias every second
        api_server.wait_for_version(new, timeout=120)
        traffic.wait(lambda answers: sum(b["model"]["version"] == new for _, b in answers) >= 3)
    answers = [a for client in traffic.answers for a in client]
    assert len(answers) > 20
    assert all(status == 200 for status, _ in answers), {s for s, _ in answers}
    seen = {body["model"]["version"] for _, body in answers}
    assert seen == {old, new}
    for client in traffic.answers:  # per client: old answers, then only new ones
        versions = [body["model"]["version"] for _, body in client]
        first_new = versions.index(new)
        assert set(versions[first_new:]) == {new}
    reference = {v: registry.predictor(v).predict_bytes([image])[0] for v in (old, new)}
    assert reference[old].probabilities != reference[new].probabilities
    for _, body in answers:
        expected = reference[body["model"]["version"]].probabilities
        assert all(abs(body["probabilities"][k] - p) < 1e-5 for k, p in expected.items())
    swaps = [e for e in api_server.logs() if e["message"] == "model swapped in"]
    assert any(e["model_version"] == new and e["previous_version"] == old for e in swaps)


def test_broken_new_version_keeps_the_old_one(api_server: ApiServer, greenr_dir: Path) -> None:
    registry = api_server.registry
    serving = api_server.model()["version"]
    broken = registry.register_broken()
    with api_server.client() as c:
        failures0 = _metric(c.get("/metrics").text, "dandelion_model_reload_failures_total")
    registry.set_alias(broken)
    deadline = time.monotonic() + 120
    while (api_server.model().get("last_failure") or {}).get("version") != broken:
        assert time.monotonic() < deadline, api_server.model()
        time.sleep(0.3)
    info = api_server.model()
    assert info["version"] == serving and info["state"] == "ready"
    assert "model.keras is corrupt" in info["last_failure"]["error"].splitlines()[0]
    image = (greenr_dir / "grass" / "00000021.jpg").read_bytes()
    with api_server.client() as c:
        r = c.post("/predict", content=image, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["model"]["version"] == serving
        assert c.get("/health/ready").status_code == 200
        text = c.get("/metrics").text
        assert _metric(text, "dandelion_model_reload_failures_total") == failures0 + 1
        assert f'version="{serving}"' in text
        # The poller does not retry the same broken version, an admin can force it.
        forced = c.post("/admin/reload", headers=AUTH).json()
        assert forced["action"] == "failed" and forced["version"] == broken
        assert forced["model"]["version"] == serving
    errors = [
        e for e in api_server.logs() if e["level"] == "error" and e.get("model_version") == broken
    ]
    assert errors and errors[0]["serving_version"] == serving
    registry.set_alias(serving)  # leave the registry as the other tests expect it


def test_unknown_alias_keeps_serving(api_server: ApiServer) -> None:
    """Deleting the alias does not unload the model being served."""
    serving = api_server.model()["version"]
    api_server.registry.client().delete_registered_model_alias(MODEL_NAME, "champion")
    try:
        with api_server.client() as c:
            r = c.post("/admin/reload", headers=AUTH).json()
            assert r["action"] == "no-alias"
            assert c.get("/health/ready").status_code == 200
            assert r["model"]["version"] == serving
    finally:
        api_server.registry.set_alias(serving)


def _metric(text: str, name: str) -> float:
    return next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
    )
