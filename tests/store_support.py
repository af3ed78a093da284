"""A real object store that counts the requests made to it (by kind), for tests that check how
many reads a step makes. It wraps a real backend; nothing is faked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from dandelion_lib.core.storage import ObjectInfo, ObjectStore


class CountingStore(ObjectStore):
    """Delegates every call to ``store`` and counts it: ``get``, ``put``, ``info`` (a HEAD),
    ``list`` (one per listing; S3 pages 1,000 keys a request), ``delete``."""

    def __init__(self, store: ObjectStore):
        self.inner = store
        self.url = store.url
        self.calls: Counter[str] = Counter()
        self.read_keys: list[str] = []

    def reset(self) -> None:
        self.calls.clear()
        self.read_keys.clear()

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        self.calls["put"] += 1
        return self.inner.put_bytes(key, data, content_type=content_type)

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        self.calls["get"] += 1
        self.read_keys.append(key)
        return self.inner.get_bytes(key, verify=verify)

    def info(self, key: str) -> ObjectInfo | None:
        self.calls["info"] += 1
        return self.inner.info(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        self.calls["list"] += 1
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(key)

    def check(self) -> None:
        self.inner.check()
