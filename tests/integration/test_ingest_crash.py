"""Crash safety: a run killed mid-way leaves nothing partial visible, and a re-run completes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import (
    LocalStore,
    ObjectStore,
    S3Store,
    StoreUnavailableError,
    sha256_hex,
)
from dandelion_lib.data import dataset
from dandelion_lib.data.ingest import ingest
from dandelion_lib.data.pool import INDEX_KEY
from tests.integration.conftest import FaultServer


@pytest.fixture(scope="module")
def reference_version(greenr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The version of the reference dataset, ingested from the folder into a scratch store
    (named ``greenr`` as the HTTP source below: the origin is part of the version)."""
    tmp = tmp_path_factory.mktemp("ref")
    report = ingest(
        Settings(workdir=tmp, source=f"greenr={greenr_dir}"),
        store=LocalStore(tmp / "s"),
        progress=False,
    )
    assert report.images == 400
    return str(report.version)


def _store_env(store: ObjectStore, s3_endpoint: str | None) -> dict[str, str]:
    env = {"DANDELION_STORE_URL": store.url}
    if isinstance(store, S3Store):
        env["DANDELION_S3_ENDPOINT_URL"] = str(s3_endpoint)
    return env


def test_killed_run_leaves_nothing_partial_and_rerun_completes(
    http_source: FaultServer,
    store: ObjectStore,
    tmp_path: Path,
    reference_version: str,
    request: pytest.FixtureRequest,
) -> None:
    endpoint = request.getfixturevalue("s3_server") if isinstance(store, S3Store) else None
    http_source.delay_s = 0.03  # ~400 x 30 ms over 2 connections: several seconds
    env = {
        **os.environ,
        **_store_env(store, endpoint),
        "DANDELION_SOURCE": f"greenr={http_source.url}",
        "DANDELION_WORKDIR": str(tmp_path / "work"),
        "DANDELION_HTTP_CONCURRENCY": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dandelion_lib.cli", "ingest", "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(store.list("raw/"))) < 60:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "ingestion made no progress"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no clean-up code runs
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -9

    # Nothing partial is visible: no version, no pointer, every raw object complete.
    assert dataset.list_versions(store) == []
    assert not store.exists(dataset.LATEST_KEY)
    with pytest.raises(dataset.DatasetNotFoundError, match="run 'dandelion ingest' first"):
        dataset.load_manifest(store)
    raw = list(store.list("raw/"))
    assert 60 <= len(raw) < 400
    for key in raw:
        assert sha256_hex(store.get_bytes(key)) == key.rsplit("/", 1)[1].split(".")[0]
    if store.exists(INDEX_KEY):
        assert isinstance(store.get_json(INDEX_KEY), dict)

    # The re-run completes and yields exactly the version of an uninterrupted ingestion.
    http_source.delay_s = 0.0
    settings = Settings(workdir=tmp_path / "work", source=f"greenr={http_source.url}")
    report = ingest(settings, store=store, progress=False)
    assert report.images == 400 and not report.rejected
    assert report.new + report.unchanged == 400 and report.unchanged >= len(raw)
    assert report.version == reference_version
    assert dataset.latest_version(store) == reference_version
    assert len(list(store.list("raw/"))) == 400


class _PointerFailsStore(LocalStore):
    """A local store whose write of ``datasets/latest`` fails: the only way to stop a run at
    exactly that point (a stand-in for a crash between the manifest and the pointer)."""

    fail = True

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None):  # type: ignore[no-untyped-def]
        if self.fail and key == dataset.LATEST_KEY:
            raise OSError("simulated crash before the pointer")
        return super().put_bytes(key, data, content_type=content_type)


def test_pointer_is_written_last(greenr_dir: Path, tmp_path: Path) -> None:
    store = _PointerFailsStore(tmp_path / "store")
    base = Settings(workdir=tmp_path, source=str(greenr_dir), max_per_class=30)
    store.fail = False
    first = ingest(base, store=store, progress=False)
    store.fail = True
    bigger = base.updated(**{"max_per_class": 40})
    with pytest.raises(OSError, match="simulated crash"):
        ingest(bigger, store=store, progress=False)
    # Readers still see the complete previous version.
    assert dataset.latest_version(store) == first.version
    assert len(dataset.load_manifest(store)) == 60
    store.fail = False
    second = ingest(bigger, store=store, progress=False)
    assert second.version != first.version and not second.created  # manifest was complete
    assert len(dataset.load_manifest(store)) == 80
    assert (
        dataset.load_manifest(store, first.version)["sha256"]
        .isin(dataset.load_manifest(store)["sha256"])
        .all()
    )


def test_rerun_repairs_checksum_lost_in_a_crash(greenr_dir: Path, tmp_path: Path) -> None:
    """A kill between writing a raw object and its checksum record (local store) and before
    the index was saved: the re-run records the checksum again."""
    store = LocalStore(tmp_path / "store")
    settings = Settings(workdir=tmp_path, source=str(greenr_dir), max_per_class=25)
    first = ingest(settings, store=store, progress=False)
    key = dataset.load_manifest(store)["key"].iloc[0]
    (store.root / LocalStore.META_DIR / f"{key}.sha256").unlink()
    store.delete(INDEX_KEY)
    assert store.info(key) is not None and store.info(key).sha256 is None  # type: ignore[union-attr]
    again = ingest(settings, store=store, progress=False)
    assert again.version == first.version and again.new == 0
    assert store.info(key).sha256 == key.rsplit("/", 1)[1].split(".")[0]  # type: ignore[union-attr]


class _StoreDiesStore(LocalStore):
    """A local store that becomes unavailable after 20 raw writes (a stand-in for a store
    outage mid-run, which cannot be triggered at a chosen moment on the real servers)."""

    puts = 0

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None):  # type: ignore[no-untyped-def]
        if key.startswith("raw/"):
            self.puts += 1
            if self.puts > 20:
                raise StoreUnavailableError(f"cannot write to local store {self.root}: gone")
        return super().put_bytes(key, data, content_type=content_type)


def test_store_outage_mid_run_stops_promptly_without_a_version(
    greenr_dir: Path, tmp_path: Path
) -> None:
    store = _StoreDiesStore(tmp_path / "store")
    settings = Settings(workdir=tmp_path, source=str(greenr_dir))
    with pytest.raises(StoreUnavailableError, match="gone"):
        ingest(settings, store=store, progress=False)
    assert store.puts < 100  # pending items were cancelled, not all attempted
    assert dataset.list_versions(store) == [] and not store.exists(dataset.LATEST_KEY)


def test_the_pool_keeps_a_bounded_number_of_items_in_flight(
    greenr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many items a source lists, at most IN_FLIGHT_PER_THREAD per thread are
    submitted and not yet collected (a real thread pool, counting its futures)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from dandelion_lib.data import pool

    state = {"outstanding": 0, "peak": 0, "submitted": 0}

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            state["outstanding"] += 1
            state["submitted"] += 1
            state["peak"] = max(state["peak"], state["outstanding"])
            return super().submit(fn, *args, **kwargs)

    collected = pool._Checkpoint.note

    def note(self: Any, o: Any, bar: Any) -> Any:
        state["outstanding"] -= 1
        return collected(self, o, bar)

    monkeypatch.setattr(pool, "ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(pool._Checkpoint, "note", note)
    settings = Settings(workdir=tmp_path, source=str(greenr_dir), max_per_class=60)
    report = ingest(settings, store=LocalStore(tmp_path / "store"), progress=False)
    assert report.images == 120 and state["submitted"] == 119  # the first item goes alone
    threads = min(8, (os.cpu_count() or 1) * 2)  # FolderSource's concurrency
    assert 0 < state["peak"] <= threads * pool.IN_FLIGHT_PER_THREAD < 119
