"""Which of a run's files go into its MLflow run, and under what names.

A record's files are snapshotted at once, because the trainer rewrites them, with secrets
masked (``redact_file``; a file holding a secret it cannot mask is skipped with a warning).
Checkpoints: only ``best``, as ``weights/best.pt``, at most every ``best_interval`` seconds while
training and once more at close (``last`` lives in object storage, see the checkpoint sink).
Event-log parts go under ``events/``. The MLflow sink's courier delivers what is staged here.

Files rank 0 shipped from another node arrive as ``s3://`` URIs: the courier fetches them
(``ShippedFiles``), not the thread that dispatches their record.
"""
from __future__ import annotations

import posixpath
import time
from pathlib import Path
from typing import Callable

from callbacks.sinks.redact import SecretInFile, redact_file
from callbacks.sinks.spool import FileStage
from callbacks.sinks.s3 import S3Setup
from callbacks.sinks.storage import ShippedFiles
from trainers.utils import LOGGER

BEST = "weights/best.pt"


class RunFiles:
    """Stages files for an MLflow run in ``stage`` and calls ``kick`` when something is new."""

    def __init__(self, stage: FileStage, secrets: set[str], best_interval: float, kick: Callable[[], object],
                 s3: S3Setup | None = None):
        """``s3``: how to fetch files that a worker on another node shipped to the run's store."""
        self.stage, self.secrets, self.best_interval, self.kick = stage, secrets, best_interval, kick
        self.s3 = s3
        self._best_path: str | None = None
        self._best_at = float("-inf")
        self.shipped = ShippedFiles(s3)

    def add(self, artifacts: dict) -> None:
        """A record's ``artifacts`` (name -> path)."""
        for name, path in artifacts.items():
            path = str(path)
            if name in ("last", "best") or path.endswith((".pt", ".pth")):
                self._checkpoint(name, path)
            else:
                self._stage(Path(path).name, path)

    def _checkpoint(self, name: str, path: str) -> None:
        if name == "best" or Path(path).stem == "best":
            self._best_path = path
            if time.monotonic() - self._best_at >= self.best_interval:
                self._best_at = time.monotonic()
                self._stage(BEST, path)

    def add_last_best(self) -> None:
        """The newest ``best`` checkpoint, whatever the interval (at close)."""
        if self._best_path:
            self._stage(BEST, self._best_path)

    def add_part(self, key: str, data: bytes) -> None:
        """An encoded event-log part (``callbacks/sinks/event_parts.py``)."""
        if self.stage.stage_bytes(f"events/{posixpath.basename(key)}", data):
            self.kick()

    def _stage(self, target: str, path: str) -> None:
        if self.shipped.route(target, path, self._snapshot):  # rank 0 ran on another node
            self.kick()

    def fetch_shipped(self) -> int:
        """Courier thread: stage the shipped files (raises while the store does not answer)."""
        return self.shipped.fetch(self._snapshot)

    def _snapshot(self, target: str, path: str, local: Path | None) -> None:
        if local is None:
            LOGGER.warning(f"mlflow: artifact {path} not found on the driver; skipped")
            return
        try:
            if self.stage.stage(target, local, lambda src, dst: redact_file(src, dst, self.secrets)):
                self.kick()
        except SecretInFile as exc:
            LOGGER.warning(f"mlflow: {exc}")
        except OSError as exc:
            LOGGER.warning(f"mlflow: could not snapshot artifact {path}: {exc}")
