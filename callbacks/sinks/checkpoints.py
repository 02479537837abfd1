"""Checkpoints to object storage: ``runs/<run_id>/weights/{last,best}.pt``, latest only.

Each ``on_model_save`` record names the local ``last``/``best`` files. They are snapshotted at
once (the trainer may overwrite them next epoch), unchanged content is skipped, and a newer
snapshot replaces an older one that has not been uploaded yet. Uploads run in the background
and survive outages of the store.
"""
from __future__ import annotations

from callbacks.sinks.storage import ShippedFiles
from callbacks.sinks.store_sink import StoreSink
from trainers.utils import LOGGER

NAMES = ("last", "best")


def checkpoint_key(run_id: str, name: str) -> str:
    return f"runs/{run_id}/weights/{name}.pt"


class CheckpointSink(StoreSink):
    """Uploads the newest ``last`` and ``best`` checkpoints of a run to ``store_uri``."""

    kind = label = "checkpoints"
    events = frozenset({"on_model_save"})

    def __init__(self, store_uri: str, run_id: str, spool_dir: str | None = None,
                 close_timeout: float = 120.0, s3=None):
        super().__init__(store_uri, run_id, spool_dir, close_timeout, s3)
        self._shipped = ShippedFiles(s3)

    def handle(self, event: str, record: dict) -> None:
        if event != "on_model_save" or self._closed is not None or record.get("rank", -1) > 0:
            return
        courier = self._start()
        for name in NAMES:
            path = (record.get("artifacts") or {}).get(name)
            if path and self._shipped.route(checkpoint_key(self.run_id, name), path, self._put):
                courier.kick()  # rank 0 ran on another node: the courier fetches it

    def _put(self, key: str, path: str, local) -> None:
        if local is None:
            LOGGER.warning(f"checkpoints: checkpoint {path} not found on the driver; skipped")
        else:
            self._courier.put_file(key, local)

    def _before_pump(self) -> int:
        """Fetch the shipped checkpoints first (raises while the store does not answer: the
        round fails and is retried, and the watermark stays before them)."""
        taken = self._taken
        self._shipped.fetch(self._put)
        return taken

    def report(self) -> dict:
        report = super().report()
        report[self.pending_key] = report[self.pending_key] + self._shipped.targets()
        return report

    def _counts(self) -> dict:
        return {"uploads": self._courier.sent if self._courier else 0}
