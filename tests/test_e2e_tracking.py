"""Whole training runs against real servers: an `mlflow server` subprocess and moto S3 (behind a
cuttable TCP proxy), in this process (``num_workers=0``) and on 2 Ray Train workers.

What a run must leave behind: params, per-step (``step/...``) and per-epoch metrics at the right
steps, ``final/`` metrics, artifacts, status FINISHED; checkpoints and a complete event log in the
bucket. Also: outages of MLflow and S3 mid-run lose nothing, the event log replays into another
MLflow, and secrets reach no param, tag, artifact or log line.
"""
from __future__ import annotations

import getpass
import io
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from callbacks.sinks import ObjectStore, checkpoint_key, read_event_log
from callbacks.sinks.mlflow_runs import metric_key
from orchestrator import Model
from tests.helpers import artifact_paths
from tests.servers import MotoServer, TcpProxy

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "e2e-tracking"
EPOCHS = 3
QUICK = dict(data="digits", imgsz=16, fraction=0.1, epochs=EPOCHS, batch=16, nbs=16, workers=0, plots=False,
             verbose=False, seed=0, log_every_n_steps=2)
# AWS_SECRET_ACCESS_KEY for this module (moto accepts any); it must never show up in MLflow or logs.
ENV_SECRET = "wJalrXUtnFEMI/K7MDENG/e2eTrackingSecretKey"
PASSWORD = "S3cr3t-Pa55word-e2e"  # basic-auth password in tracking_uri (a secret inside config)
EPOCH_KEYS = {"train/loss", "val/loss", "metrics/accuracy_top1", "metrics/accuracy_top5", "fitness", "lr/pg0"}


# ------------------------------------------------------------------------------------------ servers
@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto behind a proxy; the AWS settings go into os.environ *before* Ray starts (session
    scope, requested ahead of ``ray_session``), because Ray workers inherit the environment of
    the process that starts Ray. The module fixture below takes them out again afterwards."""
    moto = MotoServer(tmp_path_factory.mktemp("e2e-moto")).start()
    moto.create_bucket(BUCKET)
    proxy = TcpProxy(moto.port).start()
    env = {**moto.client_env(), "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "AWS_ENDPOINT_URL": proxy.url,
           "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield type("S3", (), {"moto": moto, "proxy": proxy, "env": env, "saved": saved})
    proxy.cut()
    moto.stop()


@pytest.fixture(scope="module", autouse=True)
def s3_env(s3):
    os.environ.update(s3.env)
    yield
    for key, value in s3.saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def ray_cluster(s3, ray_session):
    """The shared Ray, checked to carry this module's S3 endpoint (see ``s3``)."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def endpoint():
        return os.environ.get("AWS_ENDPOINT_URL")

    seen = ray.get(endpoint.remote())
    if seen != s3.env["AWS_ENDPOINT_URL"]:
        pytest.fail(f"Ray was started before this module set AWS_ENDPOINT_URL (its workers see {seen!r}); "
                    f"run tests/test_e2e_tracking.py before other Ray tests or on its own")
    return ray


# ------------------------------------------------------------------------------------------ helpers
def storage_uri(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{time.time_ns()}"


def train(tmp_path, name: str, server, storage: str, num_workers: int = 0, callbacks=()) -> Model:
    model = Model("cls-n.yaml")
    for event, fn in callbacks:
        model.add_callback(event, fn)
    model.train(**QUICK, project=str(tmp_path / f"proj-{name}"), name=name, tracking_uri=server.url,
                storage=storage, num_workers=num_workers)
    return model


def only_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def event_rows(storage: str, run_id: str) -> list[dict]:
    """The run's event log as records (map columns back to dicts)."""
    rows = read_event_log(storage, run_id).to_pylist()
    for row in rows:
        row["metrics"], row["artifacts"] = dict(row["metrics"] or ()), dict(row["artifacts"] or ())
    return rows


def check_event_log_complete(table: list[dict], ranks: set[int]) -> None:
    """Every record of every (rank, attempt): consecutive seqs from 0, ending with teardown."""
    groups = defaultdict(list)
    for row in table:
        groups[(row["rank"], row["attempt"])].append(row)
    assert {rank for rank, _ in groups} == ranks
    for key, rows in groups.items():
        rows.sort(key=lambda r: r["seq"])
        assert [r["seq"] for r in rows] == list(range(len(rows))), key
        assert rows[0]["event"] == "on_pretrain_routine_start" and rows[-1]["event"] == "teardown", key


def check_run(server, experiment: str, storage: str, num_workers: int) -> tuple[str, str]:
    """Everything a finished run must have in MLflow and in the bucket; returns (MLflow id, run id)."""
    client = MlflowClient(server.url)
    run = only_run(client, experiment)
    mlflow_id, tags, params = run.info.run_id, run.data.tags, run.data.params
    assert run.info.status == "FINISHED"
    run_id = tags["orchestrator.run_id"]
    assert tags["world_size"] == str(max(num_workers, 1)) and tags["task"] == "classify"
    # MLflow's own columns (User, Source, Version), as mlflow.start_run would have set them
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] and tags.get("mlflow.source.git.commit") == tags.get("git_commit")
    assert params["epochs"] == str(EPOCHS) and params["imgsz"] == "16" and params["fraction"] == "0.1"
    assert params["num_workers"] == str(num_workers) and params["storage"] == storage
    assert params["tracking_uri"] == server.url

    table = event_rows(storage, run_id)
    main = -1 if num_workers == 0 else 0
    check_event_log_complete(table, {main} if num_workers == 0 else set(range(num_workers)))
    rows = [r for r in table if r["rank"] == main]

    # Per step: the event log has every optimizer step 1..N (batch == nbs); MLflow every
    # log_every_n_steps-th, values as the worker sent them.
    batches = [r for r in rows if r["event"] == "on_train_batch_end"]
    steps = [r["step"] for r in batches]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % EPOCHS == 0
    every = QUICK["log_every_n_steps"]
    for key in ("train/loss", "lr/pg0"):
        assert history(client, mlflow_id, f"step/{key}") == \
            [(r["step"], r["metrics"][key]) for r in batches if r["step"] % every == 0]

    # Per epoch: each key once per epoch 0..EPOCHS-1.
    epochs = [r for r in rows if r["event"] == "on_fit_epoch_end" and not r["final_eval"]]
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert EPOCH_KEYS <= set(epochs[0]["metrics"])
    for key in epochs[0]["metrics"]:
        assert history(client, mlflow_id, metric_key(key)) == [(r["epoch"], r["metrics"][key]) for r in epochs], key

    # The final evaluation of the best model: under final/, one point each.
    (final,) = [r for r in rows if r["event"] == "on_fit_epoch_end" and r["final_eval"]]
    assert {"metrics/accuracy_top1", "fitness"} <= set(final["metrics"])
    for key, value in final["metrics"].items():
        assert history(client, mlflow_id, "final/" + metric_key(key)) == [(final["epoch"], value)], key

    paths = artifact_paths(client, mlflow_id)
    assert {"weights/best.pt", "results.csv", "args.yaml"} <= set(paths), paths
    assert any(p.startswith("events/") and p.endswith(".parquet") for p in paths), paths
    local = Path(client.download_artifacts(mlflow_id, "weights/best.pt"))
    assert "epoch" in torch.load(local, map_location="cpu", weights_only=True)
    csv = Path(client.download_artifacts(mlflow_id, "results.csv")).read_text().splitlines()
    assert len(csv) == 1 + EPOCHS

    store = ObjectStore.from_uri(storage)
    keys = store.list()
    assert {checkpoint_key(run_id, "last"), checkpoint_key(run_id, "best")} <= set(keys), keys
    last = torch.load(io.BytesIO(store.get_bytes(checkpoint_key(run_id, "last"))), weights_only=True)
    assert last["epoch"] == EPOCHS - 1
    return mlflow_id, run_id


# ------------------------------------------------------------------------------------------ clean runs
@pytest.fixture(scope="module")
def local_run(servers, tmp_path_factory):
    """One in-process run shared by the checks and the replay test."""
    storage = storage_uri("local")
    train(tmp_path_factory.mktemp("local"), "local", servers[0], storage)
    return storage


def test_in_process_run_reaches_mlflow_and_s3(servers, local_run):
    check_run(servers[0], "proj-local", local_run, num_workers=0)


# ------------------------------------------------------------------------------------------ outages
class Outage(threading.Thread):
    """Waits for the training run to ask for it (a file), takes MLflow (and S3) away, tells the
    run (another file), and brings them back on the same ports and stores ``seconds`` later."""

    def __init__(self, folder: Path, server, proxy=None, seconds: float = 6.0):
        super().__init__(daemon=True)
        self.folder, self.server, self.proxy, self.seconds = folder, server, proxy, seconds
        self.done = threading.Event()
        self.cut_at = self.restored_at = None

    def run(self):
        while not (self.folder / "requested").exists():
            if self.done.wait(0.05):
                return
        self.server.stop()
        if self.proxy:
            self.proxy.cut()
        self.cut_at = time.monotonic()
        (self.folder / "cut").write_text("down")
        self.done.wait(self.seconds)
        if self.proxy:
            self.proxy.restore()
        self.server.start()
        self.restored_at = time.monotonic()

    def finish(self):
        self.done.set()
        self.join(120)


def ask_for_outage(folder: Path):
    """Worker callback: at the start of epoch 1 (main rank) request the outage and wait until it
    began, so the rest of training runs with the endpoints down."""
    def outage_at_epoch_1(trainer):
        if trainer.epoch != 1 or trainer.rank not in (-1, 0) or (folder / "requested").exists():
            return
        (folder / "requested").write_text("please")
        deadline = time.monotonic() + 120
        while not (folder / "cut").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return outage_at_epoch_1


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in_process", "ray"])
def test_outage_mid_run_loses_nothing(request, servers, tmp_path, num_workers):
    """MLflow stopped and S3 cut for 6 s from the start of epoch 1, then restored: every point
    arrives exactly once, the run ends FINISHED, checkpoints and the event log are complete. On
    Ray this includes Ray Train's own checkpoint uploads to the same bucket; ``check_run`` asks
    of it all that it asks of a run without an outage (two Ray workers into MLflow and S3)."""
    if num_workers:
        request.getfixturevalue("ray_cluster")
    s3 = request.getfixturevalue("s3")
    folder = tmp_path / "signals"
    folder.mkdir()
    outage = Outage(folder, servers[0], s3.proxy)
    outage.start()
    storage = storage_uri(f"outage{num_workers}")
    try:
        train(tmp_path, f"outage{num_workers}", servers[0], storage, num_workers,
              callbacks=[("on_train_epoch_start", ask_for_outage(folder))])
    finally:
        outage.finish()
    assert outage.cut_at is not None and outage.restored_at is not None
    check_run(servers[0], f"proj-outage{num_workers}", storage, num_workers)


# ------------------------------------------------------------------------------------------ replay
def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_events_replay_cli_rebuilds_the_run_in_another_mlflow(servers, local_run, tmp_path):
    source, target = servers
    original, run_id = check_run(source, "proj-local", local_run, num_workers=0)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "events", "replay", f"run={run_id}",
                          f"tracking_uri={target.url}", f"storage={local_run}",
                          f"log_every_n_steps={QUICK['log_every_n_steps']}"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    replayed = re.search(r"as run (\w+)", out.stdout).group(1)
    src, dst = MlflowClient(source.url), MlflowClient(target.url)
    keys = {k for k in src.get_run(original).data.metrics if not k.startswith("system/")}  # not records
    assert set(dst.get_run(replayed).data.metrics) == keys
    full = lambda c, i, k: sorted((m.step, m.value, m.timestamp) for m in c.get_metric_history(i, k))  # noqa: E731
    for key in keys:
        assert full(dst, replayed, key) == full(src, original, key), key
    assert dst.get_run(replayed).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------ secrets
def test_secrets_reach_no_param_tag_artifact_or_log_line(servers, tmp_path):
    """`orchestrator train` in a fresh process, with a password in tracking_uri (MLflow sends it
    as basic auth; this server ignores it) and AWS_SECRET_ACCESS_KEY in the environment."""
    server = servers[0]
    uri = server.url.replace("http://", f"http://e2e-user:{PASSWORD}@")
    storage = storage_uri("secrets")
    args = [f"{k}={v}" for k, v in QUICK.items()]
    out = subprocess.run([sys.executable, "-m", "orchestrator", "train", "model=cls-n.yaml", *args,
                          f"project={tmp_path / 'proj-secrets'}", "name=secrets", f"tracking_uri={uri}",
                          f"storage={storage}"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    secrets = (PASSWORD, ENV_SECRET)
    output = out.stdout + out.stderr
    assert "results:" in output and not [s for s in secrets if s in output], output[-3000:]

    client = MlflowClient(server.url)
    run = only_run(client, "proj-secrets")
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking_uri"] == server.url.replace("http://", "http://***@")
    visible = [*run.data.params.keys(), *run.data.params.values(), *run.data.tags.keys(), *run.data.tags.values()]
    assert not [v for v in visible if any(s in v for s in secrets)]
    folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {"args.yaml", "best.pt", "results.csv"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not [s for s in secrets if s.encode() in data], path
    assert not [s for s in secrets if s in server.log.read_text()]
    store = ObjectStore.from_uri(storage)
    for key in store.list("events/"):
        assert not [s for s in secrets if s.encode() in store.get_bytes(key)], key
