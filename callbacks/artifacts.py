"""Files named in records when the sending worker is not on the driver's node.

Records name artifacts (plots, results.csv, checkpoints) by path. On one machine the driver-side
sinks read those paths directly. On a multi-node cluster rank 0 may run elsewhere, so its
forwarder ships each file to the run's object store first, off the training thread, and the
record carries the object's URI instead (``ArtifactShipper``); a driver-side sink turns a URI back
into a local file with ``callbacks.sinks.storage.local_file``. The object store must then be shared by the nodes (S3, or
a shared mount), as Ray Train requires for multi-node runs anyway.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import count
from pathlib import Path

from callbacks.sinks.delivery import Backoff
from callbacks.sinks.s3 import S3Setup
from callbacks.sinks.storage import ObjectStore
from trainers.utils import LOGGER



def files_key(run_id: str, rank: int, name: str) -> str:
    return f"runs/{run_id}/files/rank{rank}/{name}"


class ArtifactShipper:
    """Worker side: ``shipper(artifacts)`` snapshots each existing file at once (the trainer rewrites
    them) and returns a future of name -> URI. One background thread uploads the snapshots in order,
    retrying through an outage of the store for up to ``give_up_after`` seconds, so training never
    waits for the store; the forwarder holds the record until its future is done, so the driver gets
    a record only once its files are in the store. A file that could not be uploaded keeps its
    local path (the driver then reports it missing)."""

    def __init__(self, store_uri: str, run_id: str, rank: int, s3: S3Setup | None = None,
                 give_up_after: float = 300.0):
        self.store_uri, self.run_id, self.rank, self.s3 = str(store_uri), str(run_id), int(rank), s3
        self.give_up_after = give_up_after
        self._store = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="artifact-shipper")
        self._staging: Path | None = None
        self._names = count()

    def __call__(self, artifacts: dict) -> Future:
        staged = {name: self._snapshot(Path(str(path))) for name, path in artifacts.items()}
        return self._pool.submit(self._ship_all, dict(artifacts), staged)

    def _snapshot(self, local: Path) -> Path | None:
        if not local.is_file():
            return None
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="ship-"))
        copy = self._staging / f"{next(self._names)}-{local.name}"
        shutil.copyfile(local, copy)
        return copy

    def _ship_all(self, artifacts: dict, staged: dict) -> dict:
        return {name: self._ship(str(path), staged[name]) for name, path in artifacts.items()}

    def _ship(self, path: str, copy: Path | None) -> str:
        if copy is None:
            return path
        key = files_key(self.run_id, self.rank, Path(path).name)
        deadline, backoff = time.monotonic() + self.give_up_after, Backoff()
        while True:
            try:
                uri = self._put(key, copy)
                copy.unlink(missing_ok=True)
                return uri
            except Exception as exc:  # noqa: BLE001 - an outage: try again; training never fails for it
                wait = backoff.next()
                if time.monotonic() + wait > deadline:
                    LOGGER.warning(f"could not ship {path} to {self.store_uri} for the driver: {exc}")
                    return path
                time.sleep(wait)

    def _put(self, key: str, copy: Path) -> str:
        if self._store is None:
            self._store = ObjectStore.from_uri(self.store_uri, self.s3)
        return self._store.put_file(key, copy)
