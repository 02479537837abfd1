"""Files named in records when the sending worker is not on the driver's node.

Records name artifacts (plots, results.csv, checkpoints) by path. On one machine the driver-side
sinks read those paths directly. On a multi-node cluster rank 0 may run elsewhere, so its
forwarder ships each file to the run's object store first and the record carries the object's
URI instead (``ArtifactShipper``); a driver-side sink turns a URI back into a local file with
``callbacks.sinks.storage.local_file``. The object store must then be shared by the nodes (S3, or
a shared mount), as Ray Train requires for multi-node runs anyway.
"""
from __future__ import annotations

from pathlib import Path

from callbacks.sinks.s3 import S3Setup
from callbacks.sinks.storage import ObjectStore
from trainers.utils import LOGGER


def files_key(run_id: str, rank: int, name: str) -> str:
    return f"runs/{run_id}/files/rank{rank}/{name}"


class ArtifactShipper:
    """Worker side: ``shipper(artifacts)`` uploads each existing file and returns name -> URI.

    A file that cannot be uploaded keeps its local path (the driver then reports it missing);
    training never fails for it.
    """

    def __init__(self, store_uri: str, run_id: str, rank: int, s3: S3Setup | None = None):
        self.store_uri, self.run_id, self.rank, self.s3 = str(store_uri), str(run_id), int(rank), s3
        self._store = None

    def __call__(self, artifacts: dict) -> dict:
        if self._store is None:
            self._store = ObjectStore.from_uri(self.store_uri, self.s3)
        out = {}
        for name, path in artifacts.items():
            local = Path(str(path))
            out[name] = str(path)
            if not local.is_file():
                continue
            try:
                out[name] = self._store.put_file(files_key(self.run_id, self.rank, local.name), local)
            except Exception as exc:  # noqa: BLE001 - an upload error must not stop training
                LOGGER.warning(f"could not ship {local} to {self.store_uri} for the driver: {exc}")
        return out
