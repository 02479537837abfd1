"""Checkpoints to object storage: ``runs/<run_id>/weights/{last,best}.pt``, latest only.

Each ``on_model_save`` record names the local ``last``/``best`` files. They are snapshotted at
once (the trainer may overwrite them next epoch), unchanged content is skipped, and a newer
snapshot replaces an older one that has not been uploaded yet. Uploads run in the background
and survive outages of the store.
"""
from __future__ import annotations

from callbacks.sinks.base import Sink, make_spool_dir
from callbacks.sinks.delivery import Courier
from callbacks.sinks.spool import FileStage
from callbacks.sinks.storage import ObjectStore, local_file
from trainers.utils import LOGGER

NAMES = ("last", "best")


def checkpoint_key(run_id: str, name: str) -> str:
    return f"runs/{run_id}/weights/{name}.pt"


class CheckpointSink(Sink):
    """Uploads the newest ``last`` and ``best`` checkpoints of a run to ``store_uri``."""

    kind = "checkpoints"
    events = frozenset({"on_model_save"})

    def __init__(self, store_uri: str, run_id: str, spool_dir: str | None = None,
                 close_timeout: float = 120.0):
        super().__init__(store_uri=str(store_uri), run_id=run_id, spool_dir=spool_dir,
                         close_timeout=close_timeout)
        self._store = self._stage = self._courier = None
        self._uploaded: list[str] = []
        self._closed: dict | None = None

    def _start(self) -> None:
        if self._courier is None:
            self._store = ObjectStore.from_uri(self.store_uri)
            self._stage = FileStage(make_spool_dir(self.spool_dir, self.kind, self.run_id))
            self._courier = Courier(f"checkpoints {self._store.uri()}", self._pump)
            self._courier.start()

    def handle(self, event: str, record: dict) -> None:
        if event != "on_model_save" or self._closed is not None or record.get("rank", -1) > 0:
            return
        self._start()
        staged = False
        for name in NAMES:
            path = (record.get("artifacts") or {}).get(name)
            if not path:
                continue
            local = local_file(path)  # an s3:// URI when rank 0 ran on another node
            if local is None:
                LOGGER.warning(f"checkpoints: {name} checkpoint {path} not found on the driver; skipped")
                continue
            staged |= self._stage.stage(checkpoint_key(self.run_id, name), local)
        if staged:
            self._courier.kick()

    def _pump(self) -> bool:
        for key, path in self._stage.pending():
            try:
                self._store.put_file(key, path)
            except Exception:
                self._stage.done(key, path, delivered=False)
                raise
            self._stage.done(key, path)
            self._uploaded.append(key)
        return len(self._stage) == 0

    def flush(self) -> None:
        if self._courier is not None:
            self._courier.kick()

    def report(self) -> dict:
        pending = self._stage.targets() if self._stage else []
        return {"sink": "checkpoints", "store": self.store_uri, "run_id": self.run_id,
                "uploads": len(self._uploaded), "pending": pending,
                "spool_dir": str(self._stage.dir) if self._stage and pending else None,
                "last_error": self._courier.last_error if self._courier else None}

    def close(self, status: str = "FINISHED") -> dict:
        if self._closed is not None:
            return self._closed
        if self._courier is not None:
            self._courier.close(self.close_timeout)
        self._closed = report = self.report()
        if report["pending"]:
            LOGGER.warning(f"checkpoints: {', '.join(report['pending'])} not delivered to {self.store_uri} "
                           f"(last error: {report['last_error']}); kept in {report['spool_dir']}")
        return report
