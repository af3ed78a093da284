"""The object store behaves the same on the local and S3 backends."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import (
    CorruptObjectError,
    LocalStore,
    ObjectNotFoundError,
    ObjectStore,
    S3Store,
    StoreUnavailableError,
    open_store,
    sha256_hex,
)


def test_put_get_roundtrip_records_sha256(store: ObjectStore) -> None:
    info = store.put_bytes("raw/grass/a.jpg", b"hello")
    assert info.sha256 == sha256_hex(b"hello") and info.size == 5
    assert store.get_bytes("raw/grass/a.jpg") == b"hello"
    got = store.info("raw/grass/a.jpg")
    assert got is not None and got.sha256 == info.sha256 and got.size == 5


def test_list_exists_delete(store: ObjectStore) -> None:
    for key in ("b/2", "a/1", "a/sub/3", "c"):
        store.put_bytes(key, key.encode())
    assert list(store.list()) == ["a/1", "a/sub/3", "b/2", "c"]
    assert list(store.list("a/")) == ["a/1", "a/sub/3"]
    assert store.exists("c") and not store.exists("d")
    store.delete("c")
    store.delete("never-existed")
    assert not store.exists("c")
    assert store.info("c") is None


def test_missing_object_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="no object 'nope'"):
        store.get_bytes("nope")


def test_json_helpers(store: ObjectStore) -> None:
    store.put_json("datasets/latest", {"version": "abc"})
    assert store.get_json("datasets/latest") == {"version": "abc"}


def test_overwrite_replaces_whole_object(store: ObjectStore) -> None:
    store.put_bytes("k", b"x" * 1000)
    store.put_bytes("k", b"y")
    assert store.get_bytes("k") == b"y"


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", ".meta/x"])
def test_invalid_keys_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")


def test_corruption_detected_locally(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("raw/x.jpg", b"original")
    (tmp_path / "raw/x.jpg").write_bytes(b"tampered")
    with pytest.raises(CorruptObjectError, match="does not match"):
        store.get_bytes("raw/x.jpg")
    assert store.get_bytes("raw/x.jpg", verify=False) == b"tampered"


def test_corruption_detected_on_s3(s3_server: str, s3_bucket: str) -> None:
    import boto3

    store = S3Store(s3_bucket, endpoint_url=s3_server)
    store.put_bytes("raw/x.jpg", b"original")
    # Rewrite the object behind the store's back, keeping the old recorded digest.
    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket=s3_bucket,
        Key="raw/x.jpg",
        Body=b"tampered",
        Metadata={"sha256": sha256_hex(b"original")},
    )
    with pytest.raises(CorruptObjectError):
        store.get_bytes("raw/x.jpg")


def test_local_write_is_atomic_under_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("k", b"old")

    def boom(*_a: object) -> None:
        raise OSError("disk died")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        store.put_bytes("k", b"new-and-longer")
    monkeypatch.undo()
    assert store.get_bytes("k") == b"old"
    assert list(store.list()) == ["k"]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_concurrent_writers_never_expose_partial_objects(store: ObjectStore) -> None:
    payloads = [bytes([i]) * 200_000 for i in range(4)]
    errors: list[Exception] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = store.get_bytes("shared", verify=False)
            except ObjectNotFoundError:
                continue
            if data not in payloads:
                errors.append(AssertionError(f"partial object of {len(data)} bytes"))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(3):
        for p in payloads:
            store.put_bytes("shared", p)
    stop.set()
    t.join()
    assert not errors


def test_unreachable_s3_gives_one_line_error() -> None:
    store = S3Store("bucket-x", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StoreUnavailableError) as exc:
        store.check()
    msg = str(exc.value)
    assert "bucket-x" in msg and "127.0.0.1:9" in msg and "\n" not in msg


def test_missing_bucket_is_reported(s3_server: str) -> None:
    with pytest.raises(StoreUnavailableError, match="no-such-bucket"):
        S3Store("no-such-bucket", endpoint_url=s3_server).check()


def test_open_store_from_settings(
    tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the settings passed in decide, not the environment
    monkeypatch.setenv("DANDELION_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DANDELION_STORE_URL", "s3://elsewhere")
    local = open_store(Settings(workdir=tmp_path, store_url=None))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "store").resolve()
    s3 = open_store(Settings(s3_endpoint_url=s3_server), "s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "some/prefix"
    assert s3.endpoint_url == s3_server
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store(Settings(), "ftp://x")
