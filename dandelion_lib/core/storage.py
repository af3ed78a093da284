"""Object store: one interface, two backends (local filesystem and S3).

Both backends behave the same way (the same tests run against each):

* writes are atomic: no reader ever sees a half-written object (temp file + rename
  locally, a single PUT on S3);
* every object's sha256 is recorded when it is written and verified on read by
  default, so a corrupted object raises :class:`CorruptObjectError` instead of being used;
* problems reaching the store raise :class:`StoreUnavailableError` with a one-line
  message naming the endpoint and bucket.

Keys are ``/``-separated relative paths such as ``raw/grass/<sha256>.jpg``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError


class StoreError(DandelionError):
    """Base class of object-store errors; the message is one user-facing line."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached, or refuses our credentials."""


class ObjectNotFoundError(StoreError, KeyError):
    """No object under that key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptObjectError(StoreError):
    """The object's bytes do not match the sha256 recorded when it was written."""


class ObjectTooLargeError(StoreError):
    """The object is larger than the reader allows."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class ListedObject:
    """One object of a bucket listing (:meth:`S3Store.walk`): its key below the store's
    prefix, its size and its ETag."""

    key: str
    size: int
    etag: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key: {key!r}")
    if parts[0] == LocalStore.META_DIR or parts[-1].startswith(LocalStore.TMP_PREFIX):
        raise ValueError(f"reserved object key: {key!r}")
    return key


class ObjectStore(ABC):
    """Interface shared by every backend."""

    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        """Write ``data`` atomically under ``key`` (replacing any object there)."""

    @abstractmethod
    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        """Read an object; with ``verify`` check it against its recorded sha256."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo | None:
        """Size and recorded sha256 of an object, or None when absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, in sorted order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (no error when it does not exist)."""

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the store is reachable and usable."""

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def put_json(self, key: str, obj: Any) -> ObjectInfo:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.put_bytes(key, data, content_type="application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        return self.put_bytes(key, Path(path).read_bytes())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalStore(ObjectStore):
    """A folder on the local filesystem; sha256 digests live in ``.meta/<key>.sha256``."""

    META_DIR = ".meta"
    TMP_PREFIX = ".tmp-"

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _meta(self, key: str) -> Path:
        return self.root / self.META_DIR / f"{_check_key(key)}.sha256"

    def _atomic_write(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.TMP_PREFIX, dir=path.parent)
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot write to local store {self.root}: {exc.strerror}"
            ) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        digest = sha256_hex(data)
        path = self._path(key)
        self._atomic_write(path, data)
        self._atomic_write(self._meta(key), digest.encode())
        return ObjectInfo(key, len(data), digest)

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no object {key!r} in {self.url}") from None
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot read {key!r} from {self.url}: {exc.strerror}"
            ) from exc
        if verify:
            recorded = self._recorded(key)
            if recorded is not None and recorded != sha256_hex(data):
                raise CorruptObjectError(
                    f"object {key!r} in {self.url} does not match its recorded sha256"
                )
        return data

    def _recorded(self, key: str) -> str | None:
        try:
            return self._meta(key).read_text().strip() or None
        except FileNotFoundError:
            return None

    def info(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return ObjectInfo(key, size, self._recorded(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        if not self.root.exists():
            return iter(())
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != self.META_DIR]
                rel_dir = ""
            for name in filenames:
                if name.startswith(self.TMP_PREFIX):
                    continue
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._meta(key).unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot use local store {self.root}: {exc.strerror}"
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailableError(f"local store {self.root} is not writable")


class S3Store(ObjectStore):
    """An S3 bucket (AWS S3, MinIO, or any S3-protocol server), optionally under a prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=32,
            ),
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"

    def _error(self, exc: Exception, action: str) -> StoreError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            msg = exc.response.get("Error", {}).get("Message", "") or code
            return StoreUnavailableError(f"cannot {action} {self._where()}: {code} {msg}".strip())
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreUnavailableError(f"cannot {action} {self._where()}: {reason}")

    def _call(self, action: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, action) from exc

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        digest = hashlib.sha256(data)
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        self._call(
            "write to",
            self._client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            Metadata={"sha256": digest.hexdigest()},
            ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
            **extra,
        )
        return ObjectInfo(key, len(data), digest.hexdigest())

    def _get_object(self, key: str, full: str, limit: int | None) -> tuple[bytes, dict[str, Any]]:
        """The bytes of the object at bucket key ``full`` (all of them, or at most ``limit``)
        and its response; ``key`` names it in errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            body = resp["Body"]
            try:
                data: bytes = body.read() if limit is None else body.read(limit)
            finally:
                body.close()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFoundError(f"no object {key!r} in {self.url}") from None
            raise self._error(exc, "read from") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "read from") from exc
        return data, resp

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        data, resp = self._get_object(key, self._key(key), None)
        recorded = resp.get("Metadata", {}).get("sha256")
        if verify and recorded and recorded != sha256_hex(data):
            raise CorruptObjectError(
                f"object {key!r} in {self.url} does not match its recorded sha256"
            )
        return data

    def info(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._error(exc, "read from") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "read from") from exc
        return ObjectInfo(key, int(resp["ContentLength"]), resp.get("Metadata", {}).get("sha256"))

    def list(self, prefix: str = "") -> Iterator[str]:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"invalid key prefix: {prefix!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        keys: list[str] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._error(exc, "list") from exc
        return iter(sorted(keys))

    def walk(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ListedObject]:
        """Every object under ``prefix`` (below the store's prefix) with its size and ETag,
        in key order, one page of at most ``page_size`` keys per request, as the pages come
        (nothing is held beyond a page). Unlike :meth:`list`, keys are not checked against
        the store's key rules: this reads buckets that others write (an ingestion source)."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": page_size}
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    etag = str(obj.get("ETag", "")).strip('"')
                    yield ListedObject(obj["Key"][strip:], int(obj["Size"]), etag)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, "list") from exc

    def get_limited(self, key: str, max_bytes: int) -> bytes:
        """The bytes of an object listed by :meth:`walk` (its key is not checked, its
        checksum not verified), reading no more than ``max_bytes`` + 1 of them; raises
        :class:`ObjectTooLargeError` when it has more than ``max_bytes``."""
        full = f"{self.prefix}/{key}" if self.prefix else key
        data, _ = self._get_object(key, full, max_bytes + 1)
        if len(data) > max_bytes:
            raise ObjectTooLargeError(
                f"object {key!r} in {self.url} has more than {max_bytes:,} bytes"
            )
        return data

    def delete(self, key: str) -> None:
        self._call(
            "delete from", self._client.delete_object, Bucket=self.bucket, Key=self._key(key)
        )

    def check(self) -> None:
        self._call("reach", self._client.head_bucket, Bucket=self.bucket)


def open_store(settings: Settings, url: str | None = None) -> ObjectStore:
    """Open the store named by ``url`` (default: the settings' store URL); an S3 store takes
    its endpoint and region from ``settings``."""
    url = url or settings.resolved_store_url
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 store URL needs a bucket: {url!r}")
        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint_url=settings.storage.s3_endpoint_url,
            region=settings.storage.s3_region,
        )
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.path))
    if parsed.scheme == "":
        return LocalStore(url)
    raise ValueError(f"unsupported store URL {url!r}: use file:///path or s3://bucket[/prefix]")
