"""Object storage behind one small interface: a local directory or ``s3://bucket/prefix``.

Keys are relative posix paths chosen deterministically by callers, so an upload repeated after
an uncertain failure just rewrites the same object. S3 goes through boto3 (managed multipart
transfers, "standard" retries) as the run's ``S3Setup`` says (``callbacks/sinks/s3.py``: the
``s3_*`` config keys, then the usual AWS environment and config files). Stores pickle with their
set-up but without their client, which is opened lazily in the process that uses it.
"""
from __future__ import annotations

import abc
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlparse

from callbacks.sinks.s3 import S3Setup
from trainers.utils import LOGGER, UserError

MiB = 1 << 20


def check_key(key: str) -> str:
    key = str(key).lstrip("/")
    parts = PurePosixPath(key).parts
    if not key or any(p in ("..", ".") for p in parts):
        raise ValueError(f"bad object key {key!r}: must be a relative path without '.' or '..'")
    return key


class ObjectStore(abc.ABC):
    """Base and factory: ``ObjectStore.from_uri("s3://bucket/prefix", s3)`` or a local path."""

    @staticmethod
    def from_uri(uri: str | os.PathLike, s3: S3Setup | None = None) -> "ObjectStore":
        """The store at ``uri``; an S3 one reached as ``s3`` says (default: the AWS environment)."""
        text = str(uri)
        parsed = urlparse(text)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise UserError(f"storage: {text!r} has no bucket (expected s3://bucket/prefix)")
            return S3Store(parsed.netloc, parsed.path.strip("/"), s3)
        if parsed.scheme == "file":
            return LocalStore(parsed.path)
        if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
            raise UserError(f"storage: unsupported URI scheme {parsed.scheme!r} in {text!r} "
                            f"(use a local path or s3://bucket/prefix)")
        return LocalStore(text)

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> str:
        """Upload a local file to ``key`` (overwrites); returns the object's URI."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` to ``key`` (overwrites); returns the object's URI."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix``."""

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """Where ``key`` lives, as a path or ``s3://`` URI."""

    @abc.abstractmethod
    def arrow_fs(self):
        """(pyarrow filesystem, base path) for reading with ``pyarrow.dataset``."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise UserError naming the store when it cannot be reached or written."""


class LocalStore(ObjectStore):
    """A directory; writes go to a temp file first and are renamed, so readers never see halves."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key, path) -> str:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return str(dst)

    def put_bytes(self, key, data: bytes) -> str:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dst)
        return str(dst)

    def get_bytes(self, key) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.lstrip("/") if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in start.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-"))
        return sorted(k for k in keys if k.startswith(prefix.lstrip("/")))

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def arrow_fs(self):
        import pyarrow.fs as pafs
        return pafs.LocalFileSystem(), str(self.root)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"storage: cannot create directory {str(self.root)!r}: {exc.strerror}") from None


class S3Store(ObjectStore):
    """An S3 (or S3-compatible) bucket and key prefix, through boto3."""

    def __init__(self, bucket: str, prefix: str = "", s3: S3Setup | None = None):
        self.bucket, self.prefix, self.s3 = bucket, prefix.strip("/"), s3 or S3Setup()
        self._client = self._session = None

    def __repr__(self) -> str:
        return f"S3Store({self.uri()!r})"

    def __getstate__(self):
        return {"bucket": self.bucket, "prefix": self.prefix, "s3": self.s3, "_client": None, "_session": None}

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def client(self):
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self):
        self._session = self.s3.session()
        return self.s3.client(self._session)

    def put_file(self, key, path) -> str:
        from boto3.s3.transfer import TransferConfig
        config = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB,
                                max_concurrency=4)
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=config)
        return self.uri(key)

    def put_bytes(self, key, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return self.uri(key)

    def get_bytes(self, key) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key) -> bool:
        from botocore.exceptions import ClientError
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if missing(exc):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][cut:] for obj in page.get("Contents", ()))
        return sorted(keys)

    def uri(self, key: str = "") -> str:
        path = self._key(key) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def arrow_fs(self):
        """A pyarrow S3FileSystem reaching what this store's boto3 client reaches."""
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return self.s3.arrow_fs(self.client, self._session), base

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise UserError(f"storage: bucket {self.bucket!r} of {self.uri()!r} is not usable "
                            f"(S3 error {code})") from None
        except BotoCoreError as exc:
            raise UserError(f"storage: cannot reach the S3 endpoint for {self.uri()!r}: {exc}") from None


_downloads: Path | None = None


def missing(exc: Exception) -> bool:
    """Whether an S3 error says the object is not there (rather than that S3 did not answer)."""
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def local_file(path: str, s3: S3Setup | None = None) -> Path | None:
    """A readable local file for an artifact path or ``s3://`` URI (downloaded, as ``s3`` says, to a
    temp folder of this process, keeping the object's name); None when there is none, or when its
    store does not answer (a warning)."""
    try:
        return fetch_file(path, s3)
    except Exception as exc:  # noqa: BLE001 - reported by the caller as missing
        LOGGER.warning(f"could not fetch {path}: {exc}")
        return None


def fetch_file(path: str, s3: S3Setup | None = None) -> Path | None:
    """``local_file``, except that a store which does not answer raises, so that a caller can try
    again once it is back (a sink's courier); None only when there is no such file."""
    global _downloads
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not text.startswith("s3://"):
        return Path(text) if Path(text).is_file() else None
    parsed = urlparse(text)
    key = parsed.path.lstrip("/")
    try:
        data = ObjectStore.from_uri(f"s3://{parsed.netloc}", s3).get_bytes(key)
    except Exception as exc:
        if missing(exc):
            return None
        raise
    if _downloads is None:
        _downloads = Path(tempfile.mkdtemp(prefix="artifacts-"))
    dst = _downloads / parsed.netloc / key
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return dst


class ShippedFiles:
    """Files a worker on another node shipped to the run's store (``s3://`` URIs in its records,
    ``callbacks/artifacts.py``), for a sink to take on its courier thread, in the order they came.

    The store was up when the worker shipped them, but may be down when their record is dispatched:
    fetched then, the file would be lost. ``fetch`` raises while the store does not answer, so the
    courier retries after its backoff with the files still queued (and its round not idle: the
    sink's watermark stays before their records)."""

    def __init__(self, s3: S3Setup | None = None):
        self.s3 = s3
        self._queue: deque[tuple[str, str]] = deque()  # (target, URI), oldest first

    def __len__(self) -> int:
        return len(self._queue)

    def route(self, target: str, path: str, take: Callable[[str, str, Path | None], None]) -> bool:
        """An ``s3://`` URI waits for ``fetch`` (True: kick the courier); any other path is taken
        now, as ``take(target, path, local file or None)``."""
        if str(path).startswith("s3://"):
            self._queue.append((target, str(path)))
            return True
        take(target, path, local_file(path, self.s3))
        return False

    def targets(self) -> list[str]:
        return [target for target, _ in self._queue]

    def fetch(self, take: Callable[[str, str, Path | None], None]) -> int:
        """``take(target, uri, local file or None)`` for each, oldest first; how many were taken."""
        taken = 0
        while self._queue:
            target, uri = self._queue[0]
            take(target, uri, fetch_file(uri, self.s3))
            self._queue.popleft()
            taken += 1
        return taken
