"""What the object-store sinks (checkpoints, event log) share: lazy start, flush, report, close.

Such a sink stages files for ``store_uri`` (reached as the run's ``S3Setup`` says) in a
``FileCourier``: staging never waits on the store, uploads run in the background and survive
outages, and ``close`` waits at most ``close_timeout`` s, then reports what stayed in the local
spool (and says so in a log line).
Its watermark (``Sink.progress``) moves when a round of uploads leaves nothing staged: every
entry it had been handed when the round began is then in the store.
"""
from __future__ import annotations

from callbacks.sinks.base import Sink, drop_spool_dir, make_spool_dir
from callbacks.sinks.delivery import FileCourier
from callbacks.sinks.s3 import S3Setup
from callbacks.sinks.storage import ObjectStore
from trainers.utils import LOGGER


class StoreSink(Sink):
    """Base: subclasses stage files with ``self._start().put_file``/``put_bytes`` and may override
    the hooks ``_opened``, ``_before_pump``, ``_before_close`` and ``_counts``."""

    label = "store"  # names the sink in log lines
    pending_key = "pending"  # the report's key for the targets not delivered yet
    tracks_delivery = True

    def __init__(self, store_uri: str, run_id: str, spool_dir: str | None, close_timeout: float,
                 s3: S3Setup | None = None, **more):
        super().__init__(store_uri=str(store_uri), run_id=run_id, spool_dir=spool_dir,
                         close_timeout=close_timeout, s3=s3, **more)
        self._courier: FileCourier | None = None
        self._closed: dict | None = None
        self._taken = 0  # journal entries whose files are staged (``progress.fed`` after handling)

    def handle_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        super().handle_rows(stream, first_seq, rows)
        self._taken = self.progress.fed

    def _start(self) -> FileCourier:
        if self._courier is None:
            store = ObjectStore.from_uri(self.store_uri, self.s3)
            spool = make_spool_dir(self.spool_dir, self.kind, self.run_id)
            self._courier = FileCourier(f"{self.label} {store.uri()}", spool, store.put_file,
                                        before=self._before_pump, sent_one=self._sent_one, idle=self._idle)
            self._opened(self._courier)
        return self._courier

    def _opened(self, courier: FileCourier) -> None:
        """Runs once the courier exists (on the first record, or at ``start``)."""

    def _before_pump(self) -> int:
        """Runs on the courier thread before each upload round; what ``_idle`` gets."""
        return self._taken

    def _sent_one(self, target: str) -> None:
        """Runs on the courier thread after each upload."""

    def _idle(self, taken: int) -> None:
        """A round left nothing staged: what was taken before it is delivered."""
        self.progress.deliver(taken)

    def _before_close(self) -> None:
        """Runs at close, before the final uploads."""

    def _counts(self) -> dict:
        """The subclass's own figures in its report."""
        return {}

    def flush(self) -> None:
        """Hurry the upload of what is staged; never waits."""
        if self._courier is not None:
            self._courier.kick()

    def report(self) -> dict:
        courier = self._courier
        return {"sink": self.kind, "store": self.store_uri, "run_id": self.run_id, **self._counts(),
                self.pending_key: courier.pending() if courier else [],
                "spool_dir": courier.spool_dir() if courier else None,
                "last_error": courier.last_error if courier else None}

    def close(self, status: str = "FINISHED") -> dict:
        if self._closed is not None:
            return self._closed
        if self._courier is not None:
            self._before_close()
            self._courier.close(self.close_timeout)
        self._closed = report = self.report()
        pending = report[self.pending_key]
        if not pending:
            self._idle(self._taken)
            drop_spool_dir(self._courier and self._courier.stage.dir)
        if pending:
            LOGGER.warning(f"{self.label}: {len(pending)} files of run {self.run_id} ({_some(pending)}) not "
                           f"delivered to {self.store_uri} (last error: {report['last_error']}); "
                           f"kept in {report['spool_dir']}")
        return report


def _some(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
