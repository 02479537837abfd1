"""Shared test helpers: small fits that record every event."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow

from trainers.events import EVENTS

QUICK = dict(data="digits", imgsz=16, batch=16, nbs=32, fraction=0.05, epochs=2, verbose=False,
             plots=False, workers=0, seed=0)


class EventRecorder:
    """Registers for every event; remembers (event, epoch, final_eval)."""

    def __init__(self):
        self.events = []

    def register(self, target):
        for event in EVENTS:
            target.add_callback(event, self._make(event))
        return self

    def _make(self, event):
        def record(owner):
            trainer = getattr(owner, "parent", None) or owner
            self.events.append((event, getattr(trainer, "epoch", None), getattr(trainer, "final_eval", False)))
        record.__name__ = f"record_{event}"
        return record

    @property
    def names(self):
        return [e for e, _, _ in self.events]


STEP = ["optimizer_step", "on_before_zero_grad", "on_params_update"]


def expected_events(epochs, n_batches, accumulate, n_val_batches):
    """The exact event list of a fit (SPEC §3): epochs, then the final evaluation of best.pt."""
    val = ["on_val_start"] + ["on_val_batch_start", "on_val_batch_end"] * n_val_batches + ["on_val_end"]
    seq = ["on_pretrain_routine_start", "on_pretrain_routine_end", "on_train_start"]
    for _ in range(epochs):
        seq.append("on_train_epoch_start")
        for i in range(n_batches):
            stepped = (i + 1) % accumulate == 0 or i == n_batches - 1
            seq += ["on_train_batch_start", *(STEP if stepped else []), "on_train_batch_end"]
        seq += ["on_train_epoch_end", *val, "on_model_save", "on_fit_epoch_end"]
    return seq + val + ["on_fit_epoch_end", "on_train_end", "teardown"]


def artifact_paths(client, run_id: str, path=None) -> list[str]:
    """Every artifact path of an MLflow run, walking its folders."""
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def feed_as_batches(callbacks, records, batch: int = 5):
    """Deliver ``records`` to ``callbacks`` the way the callback actor gets them from workers:
    each rank's records as wire rows, ``batch`` at a time, ranks interleaved, through a real
    ``Dispatcher`` (whose in-order path hands sinks the rows whole). Returns the dispatcher."""
    from callbacks.dispatcher import Dispatcher
    from callbacks.records import row_of

    dispatcher = Dispatcher(callbacks)
    streams: dict[tuple, list[dict]] = {}
    for record in records:
        streams.setdefault((record["run_id"], record["rank"], record["attempt"]), []).append(record)
    cursors = {key: 0 for key in streams}
    while cursors:
        for key in list(cursors):
            chunk = streams[key][cursors[key]:cursors[key] + batch]
            dispatcher.ingest_rows(key, chunk[0]["seq"], [row_of(r) for r in chunk])
            cursors[key] += len(chunk)
            if cursors[key] == len(streams[key]):
                del cursors[key]
    return dispatcher


def wait_for_registered_checkpoint(storage, name: str, epoch: int, timeout: float = 120.0) -> None:
    """Block (in a worker callback) until Ray Train's controller has registered the checkpoint
    of ``epoch`` for run ``name`` (its Train run is ``<storage>/ray/<name>-<run id>``): the
    controller writes its checkpoint manager snapshot to storage after registering one.
    A fault injected before that (the controller polls; the upload is async) would restart
    from the previous checkpoint instead."""
    import json
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snapshot in Path(storage, "ray").glob(f"{name}-*/checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            except (OSError, ValueError):  # being written
                continue
            if latest.get("metrics", {}).get("epoch", -1) >= epoch:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of epoch {epoch} registered for {name} under {storage} in {timeout:.0f}s")


def wait_for_mlflow_run(tracking_uri: str, run_name: str, timeout: float = 120.0) -> None:
    """Block (in a worker callback) until the callback actor has made the MLflow run ``run_name``
    in experiment ``runs``: a fault injected after that lands mid-run, not inside MLflow's first
    build of a new SQLite store (a kill there leaves a store MLflow cannot migrate: another fault)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mlflow_run_made(tracking_uri, run_name):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no MLflow run {run_name} at {tracking_uri} in {timeout:.0f}s")


def mlflow_run_made(tracking_uri: str, run_name: str) -> bool:
    """Whether run ``run_name`` exists in experiment ``runs``. A SQLite store is read read-only:
    an MLflow client would build the store's tables itself, racing the actor's own build."""
    if not tracking_uri.startswith("sqlite:///"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name("runs")
        return bool(exp and client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'"))
    import sqlite3
    from contextlib import closing

    path = tracking_uri[len("sqlite:///"):]
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM runs JOIN experiments USING (experiment_id) "
                              "WHERE experiments.name = 'runs' AND runs.name = ?", (run_name,)).fetchone() is not None
    except sqlite3.OperationalError:  # no store or no tables yet
        return False


def own_lines(text: str) -> list[str]:
    """The lines this process printed itself: Ray prefixes the lines it forwards from its
    processes (``(RayTrainWorker pid=...)``, maybe colored); those of other runs' actors sharing the
    machine's Ray say nothing about this run."""
    return [line for line in text.splitlines() if not line.lstrip("\x1b[0123456789;m").startswith("(")]


@contextlib.contextmanager
def tracking(uri: str):
    """MLflow's fluent API (``models:/`` URIs) pointed at a test's store for a block; it sets
    ``$MLFLOW_TRACKING_URI`` too, which later runs would take as their store: unset again."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def system_series(client, run_id: str) -> dict[str, list[int]]:
    """Each ``system/`` key's steps, as logged (raw: a step logged twice shows twice)."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    return {k: [m.step for m in client.get_metric_history(run_id, k)] for k in keys}


def run_cluster_script(script: str, folder: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``tests/<script> <folder> <args>`` (a run on a ``ray.cluster_utils.Cluster``, in a process of
    its own so its raylets end with it); its output and the ``result.json`` it wrote."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(root / "tests" / script), str(folder), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, json.loads((folder / "result.json").read_text())
