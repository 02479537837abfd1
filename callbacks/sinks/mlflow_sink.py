"""MLflow as a driver-side sink: params once, metrics with explicit step and time, artifacts, status.

Record methods only queue: metric points (``mlflow_points.py``) in a ``Spool``, files
(``mlflow_files.py``) as snapshots in a ``FileStage`` (on disk). At most ``max_queue`` points wait
in memory: at that mark the sink is ``full``, and the callback actor leaves later entries in the
run's journal until some are out; without a journal the spool spills the rest to disk. A
background ``Courier`` hands them to a ``RunWriter`` (``mlflow_writer.py``), retrying with backoff
while the server is down.
``close`` makes a bounded final attempt, sets the run status and reports (log line and return
value) whatever stayed undelivered and where it is.

With ``event_log`` the run also gets the event log's Parquet parts under ``events/``. Alone, the
sink encodes them itself (``EventParts``); bound to an event-log sink (``bind``, done by the
callback actor) it stages that sink's parts instead, so each part is encoded once.
"""
from __future__ import annotations

import logging
import os
import threading

from callbacks.records import record_of
from callbacks.sinks.base import Sink, drop_spool_dir, make_spool_dir
from callbacks.sinks.delivery import Courier
from callbacks.sinks.event_log import EventLogSink
from callbacks.sinks.event_parts import EventParts
from callbacks.sinks.mlflow_files import RunFiles
from callbacks.sinks.mlflow_points import EPOCH_END, MetricPoints
from callbacks.sinks.mlflow_runs import END_REASON_TAG, RUN_ID_TAG, clean_params, clean_tags, short_http_retries
from callbacks.sinks.mlflow_writer import RunWriter
from callbacks.sinks.redact import install_log_filter, redact_text
from callbacks.sinks.spool import FileStage, Spool
from trainers.events import ARTIFACTS, EVENT, STEP
from trainers.utils import LOGGER

STATUSES = ("FINISHED", "FAILED", "KILLED")


class MLflowSink(Sink):
    """Logs a run's records to MLflow without ever blocking the caller on the network."""

    kind = "mlflow"
    events = None  # all: every record goes into the run's copy of the event log
    tracks_delivery = True  # the watermark moves when a delivery round leaves nothing queued

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict | None = None,
                 tags: dict | None = None, run_id: str | None = None, parent_run_id: str | None = None,
                 ckpt_upload_interval: float = 300.0, spool_dir: str | None = None,
                 max_queue: int = 20_000, *, step_prefix: str = "step/", log_every_n_steps: int = 1,
                 upload_artifacts: bool = True,
                 event_log: bool = True, find_existing: bool = True, batch_size: int = 1000,
                 flush_interval: float = 2.0, close_timeout: float = 60.0, s3=None, dataset: dict | None = None):
        super().__init__(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                         params=params, tags=tags, run_id=run_id, parent_run_id=parent_run_id,
                         ckpt_upload_interval=ckpt_upload_interval, spool_dir=spool_dir,
                         max_queue=max_queue, step_prefix=step_prefix, log_every_n_steps=log_every_n_steps,
                         upload_artifacts=upload_artifacts,
                         event_log=event_log, find_existing=find_existing, batch_size=batch_size,
                         flush_interval=flush_interval, close_timeout=close_timeout, s3=s3, dataset=dataset)
        self.params, self.tags = dict(params or {}), dict(tags or {})
        self.batch_size = min(int(batch_size), 1000)
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"MLflowSink log_every_n_steps={log_every_n_steps!r}: must be an int >= 1")
        self._parts = self._feeds_parts = None  # the parts this sink uploads; whether it encodes them
        if event_log:
            self._use_parts(EventParts(), feeds=True)
        self._started = False
        self._start_lock = threading.Lock()  # parts may arrive on an event-log sink's courier thread
        self._closed: dict | None = None
        self._taken = 0  # journal entries whose points and files are queued
        self._end_tags: dict[str, str] = {}
        self._cut_mark = None  # with parts of its own: entries whose rows are in cut parts

    def _use_parts(self, parts: EventParts, feeds: bool) -> None:
        if self._parts is not None:
            self._parts.unsubscribe(self._take_part)
        self._parts, self._feeds_parts = parts, feeds
        parts.subscribe(self._take_part)
        if feeds:
            self._cut_mark = 0
            parts.watch(self._parts_cut)

    def _parts_cut(self, mark: int, keys: list) -> None:
        self._cut_mark = mark

    def bind(self, peers: list) -> None:
        """Upload the parts of an event-log sink among ``peers`` rather than encode the same rows."""
        source = next((peer for peer in peers if isinstance(peer, EventLogSink)), None)
        if self._parts is not None and source is not None and not self._started:
            self._use_parts(source.parts, feeds=False)

    # ----------------------------------------------------------------- lazy runtime state
    def _start(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self._open()
                self._started = True

    def _open(self) -> None:
        short_http_retries()
        # MLflow writes run URLs (user:password@ of the tracking URI included) straight to stdout.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        params, secrets = clean_params(self.params)
        self._secrets = secrets
        install_log_filter(LOGGER, secrets)
        install_log_filter(logging.getLogger("mlflow"), secrets)
        self._dir = make_spool_dir(self.spool_dir, self.kind, self.run_id or self.run_name)
        self._points = Spool(self._dir / "points", self.max_queue)
        self._stage = FileStage(self._dir / "files")
        self._rule = MetricPoints(self.step_prefix, self.log_every_n_steps)
        self._writer = RunWriter(self.tracking_uri, self.experiment, self.run_name, params, clean_tags(self.tags),
                                 run_id=self.run_id, parent_run_id=self.parent_run_id,
                                 orch_run_id=self.tags.get(RUN_ID_TAG), find_existing=self.find_existing,
                                 dataset=self.dataset)
        self._courier = Courier(f"mlflow {redact_text(str(self.tracking_uri))}", self._pump,
                                interval=self.flush_interval)
        self._files = RunFiles(self._stage, secrets, self.ckpt_upload_interval, self._courier.kick, self.s3)
        self._attach_now = False
        self._status: str | None = None
        self._since_kick = 0
        self._courier.start()

    def start(self) -> None:
        """Start the courier and have it attach to the run now (imports, store, params)."""
        self._start()
        self._attach_now = True
        self._courier.kick()

    # ----------------------------------------------------------------- record side (never blocks)
    def handle(self, event: str, record: dict) -> None:
        if self._closed is not None:
            return
        self._start()
        if self._feeds_parts:
            self._parts.add(record, event)
        if int(record.get("rank", -1)) <= 0 and self._wanted(event, int(record.get("step", 0)),
                                                             record.get("artifacts")):
            self._log(event, record)

    def handle_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        """A worker's batch as it came: all rows to the event log, and only the rows that make
        points or carry files become records (one step in ``log_every_n_steps``, epoch ends)."""
        if self._closed is not None:
            return
        self._start()
        if self._feeds_parts:
            self._parts.add_rows(stream, first_seq, rows, self.progress.fed)
        if int(stream[1]) <= 0:
            for i, row in enumerate(rows):
                if self._wanted(row[EVENT], row[STEP], row[ARTIFACTS]):
                    self._log(row[EVENT], record_of(stream, first_seq + i, row))
        self._taken = self.progress.fed

    def full(self) -> bool:
        """``max_queue`` points wait for MLflow (it is down, or slower than the run): take no
        more entries until some are out (``Sink.full``)."""
        return self._started and self._closed is None and len(self._points) >= self.max_queue

    def _wanted(self, event: str, step: int, artifacts) -> bool:
        """Whether a rank-0 record can make points or carry files (the rest only go to the event log)."""
        return bool(artifacts) or self._rule.makes_points(event, step)

    def _log(self, event: str, record: dict) -> None:
        """Rank 0's record -> metric points and staged files; an epoch end is sent at once."""
        if self._writer.orch_run_id is None and record.get("run_id"):
            self._writer.orch_run_id = str(record["run_id"])
        points = self._rule.of(event, record)
        if points:
            self._points.put_many(points)
            self._since_kick += len(points)
        if self.upload_artifacts and record.get("artifacts"):
            self._files.add(record["artifacts"])
        if self._since_kick >= self.batch_size or event == EPOCH_END:
            self._since_kick = 0
            self._courier.kick()

    def _take_part(self, key: str, data: bytes) -> None:
        self._start()
        self._files.add_part(key, data)

    # ----------------------------------------------------------------- delivery side (courier thread)
    def _pump(self) -> bool:
        """One delivery round; when it leaves nothing queued, what was taken before it is
        delivered (with parts of its own, only rows already cut into parts count)."""
        taken = self._taken if self._cut_mark is None else min(self._taken, self._cut_mark)
        if self._feeds_parts:
            self._parts.cut_if_old()
        writer = self._writer
        if writer.ready or self._attach_now or self._queued() or self._status:
            self._deliver(writer)
        idle = not self._queued()
        if idle:
            self.progress.deliver(taken)
        return idle

    def _deliver(self, writer: RunWriter) -> None:
        writer.attach()
        while batch := self._points.peek(self.batch_size):
            writer.send_points(batch)
            self._points.drop(len(batch))
        self._stage.send(writer.send_file)
        if self._files.fetch_shipped():  # raises while the store does not answer: retried, files kept
            self._stage.send(writer.send_file)
        if self._status and not self._queued():
            writer.terminate(self._status, self._end_tags)

    def _queued(self) -> bool:
        """Points, staged files or shipped files not fetched yet wait for delivery."""
        return bool(len(self._points) or len(self._stage) or len(self._files.shipped))

    # ----------------------------------------------------------------- flush / close / report
    def flush(self, timeout: float = 0.0) -> bool:
        """Ask for delivery now; with ``timeout`` > 0 wait that long for it. True when all went out."""
        if not self._started:
            return True
        if timeout > 0:
            return self._courier.flush(timeout)
        self._courier.kick()
        return False

    def report(self) -> dict:
        if not self._started:
            return {"sink": "mlflow", "run_id": self.run_id, "delivered_points": 0, "pending_points": 0,
                    "pending_files": [], "status": None, "spool_dir": None, "last_error": None}
        pending, writer = len(self._points), self._writer
        files = self._stage.targets() + self._files.shipped.targets()
        return {"sink": "mlflow", "tracking_uri": redact_text(str(self.tracking_uri)), "run_id": writer.run_id,
                "delivered_points": writer.delivered, "pending_points": pending, "pending_files": files,
                "rejected_points": writer.rejected,
                "status": self._status if writer.terminated else None,
                "spool_dir": str(self._dir) if (pending or files) else None,
                "last_error": self._courier.last_error}

    def note_end(self, status: str, reason: str) -> None:
        """Why the run ends ``status`` (an error's line, a signal): a tag set with the status."""
        self._end_tags[END_REASON_TAG] = redact_text(" ".join(str(reason).split()), getattr(self, "_secrets", ()))[:5000]

    def note_tags(self, tags: dict) -> None:
        """Tags known only at the end (a sweep's best trial): set with the status."""
        self._end_tags.update(clean_tags(tags))

    def close(self, status: str = "FINISHED") -> dict:
        """Final flush within ``close_timeout`` s, then the run status; returns ``report()``."""
        if self._closed is not None:
            return self._closed
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._start()
        if self.upload_artifacts:
            self._files.add_last_best()
        if self._parts is not None:  # a bound sink cuts its peer's parts too: they are the same run's
            self._parts.cut()
            self._parts.unsubscribe(self._take_part)
        self._status = status
        self._courier.close(self.close_timeout)
        if len(self._points):
            self._points.dump()
        self._closed = report = self.report()
        if report["pending_points"] or report["pending_files"] or not self._writer.terminated:
            LOGGER.warning(
                f"mlflow: run {report['run_id']} not fully delivered to {report['tracking_uri']}: "
                f"{report['pending_points']} metric points and {len(report['pending_files'])} files pending "
                f"({', '.join(report['pending_files']) or 'no files'}), status {status} not set; "
                f"kept in {self._dir} (last error: {report['last_error']})")
        else:
            drop_spool_dir(self._dir)
        return report
