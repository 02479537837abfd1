"""MLflow as a driver-side sink: params once, metrics with explicit step and time, artifacts, status.

Record methods only queue (metric points in a disk-spilling ``Spool``, files as snapshots in a
``FileStage``); a background ``Courier`` sends them with ``log_batch`` (<= 1000 metrics per
request) and ``log_artifact``, retrying with backoff while the server is down. Re-sending a
point after an uncertain failure is harmless: the SQL store ignores an exact duplicate
(same key, value, step, timestamp). ``close`` makes a bounded final attempt, sets the run
status and reports (log line and return value) whatever stayed undelivered and where it is.

Metric steps: ``on_train_batch_end`` values go under ``step_prefix`` (default ``step/``) at the
optimizer step, ``on_fit_epoch_end`` values under their own names at the epoch, and the final
evaluation's under ``final/``, so no key mixes two x axes and no step is logged twice.
Per-step points go at every ``log_every_n_steps``-th optimizer step (the first batch that reaches
it, when several batches share a step): MLflow's SQL store spends ~100 us of CPU per point, which
at hundreds of steps/s would take a core from training. The event log keeps every step.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

from callbacks.records import record_of, spans_after
from callbacks.sinks.base import Sink, make_spool_dir
from callbacks.sinks.delivery import Courier
from callbacks.sinks.event_log import PartBuffer
from callbacks.sinks.redact import (SecretInFile, flatten, install_log_filter, redact_file,
                                    redact_params, redact_text, secret_values)
from callbacks.sinks.spool import FileStage, Spool
from callbacks.sinks.storage import local_file
from trainers.utils import LOGGER, UserError

STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_KEY = 250
RUN_ID_TAG = "orchestrator.run_id"
EVENT_LOG_ROWS = 20_000  # records per event-log part uploaded as an artifact (bounds memory)
# MLflow's own HTTP retries: short, so a down server fails fast and our backoff takes over.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_BAD_CHARS = re.compile(r"[^/\w.\- :]")


def short_http_retries() -> None:
    """Make MLflow's HTTP retries short in this process unless the user chose values."""
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def _scoped_short_retries():
    saved = {k: os.environ.get(k) for k in HTTP_ENV}
    short_http_retries()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def metric_key(name: str) -> str:
    """A name MLflow accepts: parentheses dropped (``mAP50(B)`` -> ``mAP50B``), others -> ``_``."""
    key = _BAD_CHARS.sub("_", str(name).replace("(", "").replace(")", ""))
    key = posixpath.normpath(key).lstrip("/") if key else "_"
    return "_" if key in (".", "") else key.replace("../", "__/")


def _param_value(value) -> str:
    return str(value)


def local_artifact_root(client, name: str) -> str | None:
    """With a SQLite store, artifacts live beside the database (``runs/mlartifacts/<experiment>``),
    not in ``./mlruns`` of whatever folder the process runs in; servers keep their own setting."""
    uri = str(client.tracking_uri)
    if not uri.startswith("sqlite:///"):
        return None
    root = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return (root / safe).as_uri()


def ensure_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(client, name))
    except MlflowException:  # created concurrently by someone else
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def clean_params(params: dict) -> tuple[dict[str, str], set[str]]:
    """Flatten + redact; returns (params to log, secret values found under secret-named keys)."""
    flat = flatten(params or {})
    secrets = secret_values(flat)
    clean = {}
    for key, value in redact_params(flat).items():
        key = metric_key(key)
        if len(key) > MAX_KEY:
            LOGGER.warning(f"mlflow: param {key[:60]}... longer than {MAX_KEY} characters; not logged")
            continue
        clean[key] = _param_value(value)
    return clean, secrets


def _log_params_tags(client, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
    """Params not yet on the run (params are write-once), then all tags (last write wins)."""
    from mlflow.entities import Param, RunTag
    existing = client.get_run(run_id).data.params
    for key in sorted(k for k in params if k in existing and existing[k] != params[k]):
        LOGGER.warning(f"mlflow: param {key} already set on run {run_id} to another value; kept")
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    if new or tag_list:
        client.log_batch(run_id, params=new, tags=tag_list, synchronous=True)


def _new_run(client, experiment: str, run_name: str, tags: dict, parent_run_id: str | None) -> str:
    exp_id = ensure_experiment(client, experiment)
    run_tags = dict(tags)
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=run_tags).info.run_id


def _clean_tags(tags: dict) -> dict[str, str]:
    return {metric_key(k): str(v) for k, v in redact_params(dict(tags or {})).items()}


def create_run(tracking_uri: str, experiment: str, run_name: str, params: dict | None = None,
               tags: dict | None = None, parent_run_id: str | None = None) -> str:
    """Create the MLflow run up front (params and tags logged) and return its id.

    Called on the driver before launching, so the run exists even if training dies early.
    An unreachable server raises UserError naming the tracking URI.
    """
    from mlflow.tracking import MlflowClient
    clean, _ = clean_params(params or {})
    tag_map = _clean_tags(tags or {})
    with _scoped_short_retries():
        try:
            client = MlflowClient(tracking_uri)
            run_id = _new_run(client, experiment, run_name, tag_map, parent_run_id)
            _log_params_tags(client, run_id, clean, tag_map)
        except Exception as exc:
            raise UserError(f"MLflow: cannot create run {run_name!r} at tracking_uri="
                            f"{redact_text(str(tracking_uri))}: {redact_text(_first_line(exc))}") from None
    return run_id


def announce_run(run_id: str, experiment: str, tracking_uri: str) -> None:
    LOGGER.info(f"MLflow run {run_id} in experiment '{experiment}' at "
                f"{redact_text(str(tracking_uri))}")  # no user:password@ in logs


def probe_tracking_uri(tracking_uri: str, timeout: float = 5.0) -> bool:
    """Check a tracking URI without importing MLflow (which takes seconds): True when checked
    (a SQLite file whose folder can be made, an HTTP server that accepts connections), False
    for other stores (only MLflow itself can check those). Unreachable: UserError naming it."""
    uri = str(tracking_uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"MLflow: cannot create the folder of tracking_uri={uri}: {exc.strerror or exc}") from None
        return True
    if not uri.startswith(("http://", "https://")):
        return False
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname:
        raise UserError(f"MLflow: tracking_uri={redact_text(uri)} names no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"MLflow: cannot reach tracking_uri={redact_text(uri)}: {reason}") from None
    return True


def _is_invalid(exc: Exception) -> bool:
    """MLflow refused the content itself (a retry would fail the same way)."""
    return getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class MLflowSink(Sink):
    """Logs a run's records to MLflow without ever blocking the caller on the network."""

    kind = "mlflow"
    create_run = staticmethod(create_run)

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict | None = None,
                 tags: dict | None = None, run_id: str | None = None, parent_run_id: str | None = None,
                 ckpt_upload_interval: float = 300.0, spool_dir: str | None = None,
                 max_queue: int = 100_000, *, step_prefix: str = "step/", log_every_n_steps: int = 1,
                 upload_artifacts: bool = True,
                 event_log: bool = True, find_existing: bool = True, batch_size: int = 1000,
                 flush_interval: float = 2.0, close_timeout: float = 60.0):
        super().__init__(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                         params=params, tags=tags, run_id=run_id, parent_run_id=parent_run_id,
                         ckpt_upload_interval=ckpt_upload_interval, spool_dir=spool_dir,
                         max_queue=max_queue, step_prefix=step_prefix, log_every_n_steps=log_every_n_steps,
                         upload_artifacts=upload_artifacts,
                         event_log=event_log, find_existing=find_existing, batch_size=batch_size,
                         flush_interval=flush_interval, close_timeout=close_timeout)
        self.params, self.tags = dict(params or {}), dict(tags or {})
        self.batch_size = min(int(batch_size), 1000)
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"MLflowSink log_every_n_steps={log_every_n_steps!r}: must be an int >= 1")
        self._started = False
        self._closed: dict | None = None

    # ----------------------------------------------------------------- lazy runtime state
    def _start(self) -> None:
        if self._started:
            return
        short_http_retries()
        # MLflow writes run URLs (user:password@ of the tracking URI included) straight to stdout.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._clean_params, self._secrets = clean_params(self.params)
        self._clean_tags = _clean_tags(self.tags)
        install_log_filter(LOGGER, self._secrets)
        install_log_filter(logging.getLogger("mlflow"), self._secrets)
        self._dir = make_spool_dir(self.spool_dir, self.kind, self.run_id or self.run_name)
        self._points = Spool(self._dir / "points", self.max_queue)
        self._stage = FileStage(self._dir / "files")
        self._events = PartBuffer()
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}
        self._client = None
        self._ready = self._terminated = self._attach_now = False
        self._status: str | None = None
        self._orch_run_id: str | None = self.tags.get(RUN_ID_TAG)
        self._since_kick = 0
        self._last_step = None  # optimizer step of the last per-step point
        self._delivered = self._rejected = 0
        self._best_path: str | None = None
        self._best_at = float("-inf")
        self._courier = Courier(f"mlflow {redact_text(str(self.tracking_uri))}", self._pump,
                                interval=self.flush_interval)
        self._courier.start()
        self._started = True

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
        if self.event_log:
            with self._lock:
                self._events.add(record, event)
        rank0 = int(record.get("rank", -1)) <= 0
        if rank0 and self._logs(event, int(record.get("step", 0)), record.get("artifacts")):
            self._log(event, record)
        self._maybe_cut(rank0 and event == "on_fit_epoch_end")

    def handle_rows(self, stream: tuple, first_seq: int, rows: list) -> None:
        """A worker's batch as it came: all rows to the event log, and only the rows that make
        points or carry files become records (one step in ``log_every_n_steps``, epoch ends)."""
        if self._closed is not None:
            return
        self._start()
        rank0 = int(stream[1]) <= 0
        for start, end, epoch_end in spans_after(rows, "on_fit_epoch_end"):
            if self.event_log:
                with self._lock:
                    self._events.add_rows(stream, first_seq + start, rows[start:end])
            for i in range(start, end) if rank0 else ():
                if self._logs(rows[i][0], rows[i][2], rows[i][5]):
                    self._log(rows[i][0], record_of(stream, first_seq + i, rows[i]))
            self._maybe_cut(rank0 and epoch_end)

    def _logs(self, event: str, step: int, artifacts) -> bool:
        """Whether a rank-0 record can make points or carry files (the rest only go to the event log)."""
        return bool(artifacts) or event == "on_fit_epoch_end" or (
            event == "on_train_batch_end" and step % self.log_every_n_steps == 0)

    def _log(self, event: str, record: dict) -> None:
        """Rank 0's record -> metric points and staged files."""
        if self._orch_run_id is None and record.get("run_id"):
            self._orch_run_id = str(record["run_id"])
        points = self._points_of(event, record)
        if points:
            self._points.put_many(points)
            self._since_kick += len(points)
            if self._since_kick >= self.batch_size:
                self._since_kick = 0
                self._courier.kick()
        if self.upload_artifacts and record.get("artifacts"):
            self._stage_artifacts(event, record["artifacts"])

    def _maybe_cut(self, epoch_end: bool) -> None:
        if epoch_end or (self.event_log and self._events.count >= EVENT_LOG_ROWS):
            self._cut_event_log()
            self._courier.kick()

    def _key(self, prefix: str, name: str) -> str:
        full = prefix + name
        key = self._keys.get(full)
        if key is None:
            key = self._keys[full] = metric_key(full)[:MAX_KEY]
        return key

    def _points_of(self, event: str, record: dict) -> list[list]:
        metrics = record.get("metrics")
        if not metrics:
            return []
        if event == "on_train_batch_end":
            prefix, step = self.step_prefix, int(record.get("step", 0))
            if step % self.log_every_n_steps or step == self._last_step:
                return []
            self._last_step = step
        elif event == "on_fit_epoch_end":
            prefix, step = ("final/" if record.get("final_eval") else ""), int(record.get("epoch", 0))
        else:
            return []
        ts = int(float(record.get("time", time.time())) * 1000)
        return [[self._key(prefix, k), float(v), ts, step] for k, v in metrics.items()]

    def _stage_artifacts(self, event: str, artifacts: dict) -> None:
        for name, path in artifacts.items():
            if name in ("last", "best") or str(path).endswith((".pt", ".pth")):
                if name == "best" or Path(str(path)).stem == "best":
                    self._best_path = str(path)
                    if time.monotonic() - self._best_at >= self.ckpt_upload_interval:
                        self._best_at = time.monotonic()
                        self._stage_file("weights/best.pt", self._best_path)
                continue
            self._stage_file(Path(str(path)).name, str(path))

    def _stage_file(self, target: str, path: str) -> None:
        local = local_file(path)  # an s3:// URI when rank 0 ran on another node (callbacks/artifacts.py)
        if local is None:
            LOGGER.warning(f"mlflow: artifact {path} not found on the driver; skipped")
            return
        try:
            if self._stage.stage(target, local, lambda s, d: redact_file(s, d, self._secrets)):
                self._courier.kick()
        except SecretInFile as exc:
            LOGGER.warning(f"mlflow: {exc}")
        except OSError as exc:
            LOGGER.warning(f"mlflow: could not snapshot artifact {path}: {exc}")

    def _cut_event_log(self) -> None:
        if not self.event_log:
            return
        with self._lock:
            parts = self._events.cut()
        for key, data in parts:
            self._stage.stage_bytes(f"events/{posixpath.basename(key)}", data)

    # ----------------------------------------------------------------- delivery side (courier thread)
    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _attach(self, client) -> None:
        """Find or create the run, then log params (once) and tags."""
        tags = dict(self._clean_tags)
        if self._orch_run_id:
            tags.setdefault(RUN_ID_TAG, self._orch_run_id)
        if self.run_id is None:
            self.run_id = self._find_run(client)
            if self.run_id is None:
                self.run_id = _new_run(client, self.experiment, self.run_name, tags, self.parent_run_id)
                announce_run(self.run_id, self.experiment, self.tracking_uri)
        try:
            _log_params_tags(client, self.run_id, self._clean_params, tags)
        except Exception as exc:
            if not _is_invalid(exc):
                raise
            LOGGER.warning(f"mlflow: params/tags of run {self.run_id} rejected ({_first_line(exc)}); "
                           f"logging metrics without them")
        self._ready = True

    def _find_run(self, client) -> str | None:
        """A run already made for these records (e.g. before an actor restart)."""
        if not (self.find_existing and self._orch_run_id):
            return None
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], max_results=1,
                                  filter_string=f"tags.`{RUN_ID_TAG}` = '{self._orch_run_id}'")
        return runs[0].info.run_id if runs else None

    def _pump(self) -> bool:
        if not self._ready and not (self._attach_now or len(self._points) or len(self._stage) or self._status):
            return True
        from mlflow.entities import Metric
        client = self._mlflow()
        if not self._ready:
            self._attach(client)
        while batch := self._points.peek(self.batch_size):
            self._send_points(client, [Metric(k, v, ts, step) for k, v, ts, step in batch])
            self._points.drop(len(batch))
            self._delivered += len(batch)
        for target, path in self._stage.pending():
            try:
                client.log_artifact(self.run_id, str(path), posixpath.dirname(target) or None)
            except Exception:
                self._stage.done(target, path, delivered=False)
                raise
            self._stage.done(target, path)
        idle = not len(self._points) and not len(self._stage)
        if idle and self._status and not self._terminated:
            client.set_terminated(self.run_id, self._status)
            self._terminated = True
        return idle

    def _send_points(self, client, metrics: list) -> None:
        """log_batch; a batch MLflow rejects as invalid is split until the bad point is found and
        dropped (counted in the report), so one bad value never blocks the rest of the run."""
        try:
            client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        except Exception as exc:
            if not _is_invalid(exc):
                raise
            if len(metrics) == 1:
                self._rejected += 1
                if self._rejected == 1:
                    LOGGER.warning(f"mlflow: point {metrics[0].key}@{metrics[0].step} rejected "
                                   f"({_first_line(exc)}); dropped (further ones are counted)")
                return
            half = len(metrics) // 2
            self._send_points(client, metrics[:half])
            self._send_points(client, metrics[half:])

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
        pending = len(self._points)
        files = self._stage.targets()
        return {"sink": "mlflow", "tracking_uri": redact_text(str(self.tracking_uri)), "run_id": self.run_id,
                "delivered_points": self._delivered, "pending_points": pending, "pending_files": files,
                "rejected_points": self._rejected,
                "status": self._status if self._terminated else None,
                "spool_dir": str(self._dir) if (pending or files) else None,
                "last_error": self._courier.last_error}

    def close(self, status: str = "FINISHED") -> dict:
        """Final flush within ``close_timeout`` s, then the run status; returns ``report()``."""
        if self._closed is not None:
            return self._closed
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._start()
        if self.upload_artifacts and self._best_path:
            self._stage_file("weights/best.pt", self._best_path)
        self._cut_event_log()
        self._status = status
        self._courier.close(self.close_timeout)
        if len(self._points):
            self._points.dump()
        self._closed = report = self.report()
        if report["pending_points"] or report["pending_files"] or not self._terminated:
            LOGGER.warning(
                f"mlflow: run {self.run_id} not fully delivered to {report['tracking_uri']}: "
                f"{report['pending_points']} metric points and {len(report['pending_files'])} files pending "
                f"({', '.join(report['pending_files']) or 'no files'}), status {status} not set; "
                f"kept in {self._dir} (last error: {report['last_error']})")
        return report
