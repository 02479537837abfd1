"""MLflow runs, the one place that finds, creates and checks them (the sink, the driver, sweeps).

A run made by the orchestrator carries its run id in the ``orchestrator.run_id`` tag, so the run
is found again after an actor restart or a sweep resume (``find_run``). Params and tags are
flattened and redacted before they leave the process; keys are made acceptable to MLflow by
``metric_key``. MLflow itself is imported only inside the functions that talk to a server, so the
driver can probe a tracking URI (``probe_tracking_uri``) without paying for that import.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import socket
import urllib.parse
from pathlib import Path

from callbacks.sinks.redact import flatten, redact_params, redact_text, secret_values
from trainers.utils import LOGGER, UserError

MAX_KEY = 250
RUN_ID_TAG = "orchestrator.run_id"
# On a child run (a sweep trial): the orchestrator run id of its parent, whose MLflow run may not
# exist yet when the child's sink starts (both are made by sinks that wait out an outage).
PARENT_TAG = "orchestrator.parent_run_id"
END_REASON_TAG = "orchestrator.end_reason"  # why a run failed or was killed
# A sweep trial's latest start from another trial's checkpoint (ms): its points since begin a new lineage.
CLONED_TAG = "orchestrator.cloned_at"
# MLflow's own HTTP retries: short, so a down server fails fast and the sinks' backoff takes over.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_BAD_CHARS = re.compile(r"[^/\w.\- :]")


# ----------------------------------------------------------------------------- names and values
def metric_key(name: str) -> str:
    """A name MLflow accepts: parentheses dropped (``mAP50(B)`` -> ``mAP50B``), others -> ``_``."""
    key = _BAD_CHARS.sub("_", str(name).replace("(", "").replace(")", ""))
    key = posixpath.normpath(key).lstrip("/") if key else "_"
    return "_" if key in (".", "") else key.replace("../", "__/")


def clean_params(params: dict) -> tuple[dict[str, str], set[str]]:
    """Flatten + redact; returns (params to log, secret values found under secret-named keys)."""
    flat = flatten(params or {})
    clean = {}
    for key, value in redact_params(flat).items():
        key = metric_key(key)
        if len(key) > MAX_KEY:
            LOGGER.warning(f"mlflow: param {key[:60]}... longer than {MAX_KEY} characters; not logged")
            continue
        clean[key] = str(value)
    return clean, secret_values(flat)


def clean_tags(tags: dict) -> dict[str, str]:
    return {metric_key(k): str(v) for k, v in redact_params(dict(tags or {})).items()}


def is_invalid(exc: Exception) -> bool:
    """MLflow refused the content itself (a retry would fail the same way)."""
    return getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE"


OS_ERROR = re.compile(r"\[Errno -?\d+\] [^\"')]+")  # what a connection error comes down to


def first_line(exc: Exception) -> str:
    """The error in a line; for a connection error the OS's own words (``[Errno 111] Connection
    refused``), not the ~400 characters of MLflow's and urllib3's wrapping; any other error whole
    (a path's ``[Errno 13] Permission denied: '/x'`` keeps its path)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    cause = OS_ERROR.search(line) if "Max retries exceeded" in line else None
    return f"{type(exc).__name__}: {cause[0] if cause else line}"


# ----------------------------------------------------------------------------- HTTP retries
def short_http_retries() -> None:
    """Make MLflow's HTTP retries short in this process unless the user chose values."""
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def scoped_short_retries():
    """Short retries for one call on the driver, whose environment is the user's."""
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


# ----------------------------------------------------------------------------- runs
def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri)


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


def find_run(client, experiment: str, run_id: str):
    """The MLflow run (entity) tagged with the orchestrator's ``run_id`` in ``experiment``, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1,
                              filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
    return runs[0] if runs else None


def new_run(client, experiment: str, run_name: str, tags: dict, parent_run_id: str | None) -> str:
    """A new run (a child of ``parent_run_id`` when given) with ``tags``; its id."""
    exp_id = ensure_experiment(client, experiment)
    run_tags = dict(tags)
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=run_tags).info.run_id


def reopen_run(client, run_id: str) -> None:
    """Mark a run found again (a resumed sweep or run) as running, without the reason it ended for."""
    client.update_run(run_id, status="RUNNING")
    if END_REASON_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, END_REASON_TAG)


def continue_run(tracking_uri: str, experiment: str, orch_run_id: str) -> str | None:
    """The MLflow run of the orchestrator's run ``orch_run_id`` marked running again (``resume=``),
    or None when there is none."""
    client = mlflow_client(tracking_uri)
    run = find_run(client, experiment, orch_run_id)
    if run is None:
        return None
    reopen_run(client, run.info.run_id)
    LOGGER.info(f"continuing MLflow run {run.info.run_id} in experiment '{experiment}'")
    return run.info.run_id


def last_steps(client, run) -> dict[str, int]:
    """Each metric's last step in ``run``: a run continued (``resume=``, a restarted callback actor)
    logs only later steps, so no (key, step) point is logged twice, whatever the restart repeated.
    In a sweep trial PBT started from another trial's checkpoint, only the points since
    (``CLONED_TAG``) count: the earlier lineage may have gone further.
    ``system/`` metrics have a monitor of their own (``callbacks/system_metrics.py``)."""
    since = int(run.data.tags.get(CLONED_TAG, 0))
    floors = {}
    for key in (k for k in run.data.metrics if not k.startswith("system/")):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key) if m.timestamp >= since]
        if steps:
            floors[key] = max(steps)
    return floors


def log_params_tags(client, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
    """Params not yet on the run (params are write-once), then all tags (last write wins)."""
    from mlflow.entities import Param, RunTag
    existing = client.get_run(run_id).data.params
    kept = sorted(k for k in params if k in existing and existing[k] != params[k])
    if kept:  # a resumed run's resume= (and any key it changed)
        LOGGER.info(f"mlflow: params of run {run_id} kept as first logged: {', '.join(kept)}")
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    if new or tag_list:
        client.log_batch(run_id, params=new, tags=tag_list, synchronous=True)


def log_dataset(client, run_id: str, dataset: dict | None) -> None:
    """The run's data set as an MLflow dataset input (the run page's Datasets, context ``training``):
    name, digest, source, and split sizes and class names as its profile (``trainers/data/lineage.py``).
    MLflow keeps one input per name and digest: logging it again (an actor restart) adds none."""
    if not dataset:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(name=dataset["name"], digest=dataset["digest"], source_type="local",
                     source=json.dumps({"uri": dataset["source"]}),
                     profile=json.dumps({"splits": dataset["splits"], "names": dataset["names"]}))
    client.log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context", "training")])])


def create_run(tracking_uri: str, experiment: str, run_name: str, params: dict | None = None,
               tags: dict | None = None, parent_run_id: str | None = None) -> str:
    """Create the MLflow run up front (params and tags logged) and return its id.

    Called on the driver before launching, so the run exists even if training dies early.
    An unreachable server raises UserError naming the tracking URI.
    """
    clean, _ = clean_params(params or {})
    tag_map = clean_tags(tags or {})
    with scoped_short_retries():
        try:
            client = mlflow_client(tracking_uri)
            run_id = new_run(client, experiment, run_name, tag_map, parent_run_id)
            log_params_tags(client, run_id, clean, tag_map)
        except Exception as exc:
            raise UserError(f"MLflow: cannot create run {run_name!r} at tracking_uri="
                            f"{redact_text(str(tracking_uri))}: {redact_text(first_line(exc))}") from None
    return run_id


def announce_run(run_id: str, experiment: str, tracking_uri: str) -> None:
    LOGGER.info(f"MLflow run {run_id} in experiment '{experiment}' at "
                f"{redact_text(str(tracking_uri))}")  # no user:password@ in logs


# ----------------------------------------------------------------------------- probing
def run_url(tracking_uri: str, run_id: str) -> str | None:
    """The run's page in the UI an MLflow server serves; None for a local store (or an unreachable one)."""
    if not str(tracking_uri).startswith(("http://", "https://")):
        return None
    try:
        with scoped_short_retries():
            experiment = mlflow_client(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:
        return None
    return f"{redact_text(str(tracking_uri)).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def probe_tracking_uri(tracking_uri: str, timeout: float = 5.0) -> bool:
    """Check a tracking URI without importing MLflow (which takes seconds): True when checked
    (a SQLite file whose folder can be made, an HTTP server that accepts connections), False
    for other stores (only MLflow itself can check those). Unreachable: UserError naming it."""
    uri = str(tracking_uri)
    if uri.startswith("sqlite:///"):
        _make_sqlite_folder(uri)
        return True
    if not uri.startswith(("http://", "https://")):
        return False
    _connect(uri, timeout)
    return True


def _make_sqlite_folder(uri: str) -> None:
    folder = Path(uri[len("sqlite:///"):]).expanduser().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"MLflow: cannot create the folder of tracking_uri={uri}: {exc.strerror or exc}") from None


def _connect(uri: str, timeout: float) -> None:
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname:
        raise UserError(f"MLflow: tracking_uri={redact_text(uri)} names no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"MLflow: cannot reach tracking_uri={redact_text(uri)}: {reason}") from None
