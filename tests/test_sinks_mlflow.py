"""MLflowSink against a real `mlflow server` subprocess: logging, outage survival, replay, secrets."""
from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from callbacks.sinks import EventLogSink, MLflowSink, create_run, replay_run
from callbacks.sinks.mlflow_runs import probe_tracking_uri
from callbacks.sinks.redact import MASK
from tests.helpers import artifact_paths, feed_as_batches
from tests.servers import expected_metrics, free_port, metric_histories, mlflow_store, record_stream
from trainers.utils import LOGGER, UserError

CONFIG = {"epochs": 2, "lr0": 0.01, "model": "det-n.yaml", "db_password": "hunter2-pass",
          "data": {"path": "datasets/shapes8", "token": "tok-12345678"}}


@pytest.fixture
def server(servers):
    return servers[0]


class Lines(logging.Handler):
    """Collects formatted log lines of the orchestrator and mlflow loggers."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))

    def __enter__(self):
        for name in ("orchestrator", "mlflow"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("orchestrator", "mlflow"):
            logging.getLogger(name).removeHandler(self)


@pytest.mark.parametrize("via", ["records", "batches"])
def test_logs_params_metrics_artifacts_status(server, tmp_path, via):
    """The same run whether records come one by one or as workers' batches (the actor's path)."""
    records = list(record_stream(tmp_path / "save", run_id="orch-1", config=CONFIG))
    run_id = create_run(server.url, "proj", "exp-a", CONFIG, {"team": "vision"})
    sink = MLflowSink(server.url, "proj", "exp-a", CONFIG, {"team": "vision"}, run_id=run_id,
                      spool_dir=str(tmp_path / "spool"))
    sink = pickle.loads(pickle.dumps(sink))  # as shipped into the actor
    if via == "records":
        for record in records:
            getattr(sink, record["event"])(record)
    else:
        assert feed_as_batches([sink], records, batch=5).stats()["dispatched"] == len(records)
    report = sink.close("FINISHED")
    assert report["pending_points"] == 0 and report["pending_files"] == [] and report["status"] == "FINISHED"
    assert list((tmp_path / "spool").iterdir()) == []  # all delivered: the sink's spool folder is gone

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "exp-a"
    assert client.get_experiment(run.info.experiment_id).name == "proj"
    assert run.data.params["lr0"] == "0.01" and run.data.params["data.path"] == "datasets/shapes8"
    assert run.data.params["db_password"] == MASK and run.data.params["data.token"] == MASK
    assert run.data.tags["team"] == "vision" and run.data.tags["orchestrator.run_id"] == "orch-1"

    expected = expected_metrics(records)
    assert set(run.data.metrics) == set(expected)
    assert {"step/train/box_loss", "metrics/mAP50B", "final/metrics/mAP50B", "final/fitness"} <= set(expected)
    assert metric_histories(client, run_id, expected) == expected
    assert [s for s, _, _ in expected["metrics/mAP50B"]] == [0, 1]
    assert [s for s, _, _ in expected["final/metrics/mAP50B"]] == [2]

    paths = artifact_paths(client, run_id)
    assert {"weights/best.pt", "results.csv", "results.png", "args.yaml", "confusion_matrix.png"} <= set(paths)
    assert "weights/last.pt" not in paths
    assert any(p.startswith("events/part-") and p.endswith(".parquet") for p in paths)
    csv = (server.root / "artifacts").rglob("results.csv")
    assert next(csv).read_text() == (tmp_path / "save" / "results.csv").read_text()  # latest wins


def test_outage_mid_run_delivers_every_point_once(server, tmp_path):
    records = list(record_stream(tmp_path / "save", run_id="orch-2", epochs=2, steps=40))
    run_id = create_run(server.url, "proj", "exp-outage", {"epochs": 2}, {})
    sink = MLflowSink(server.url, "proj", "exp-outage", {"epochs": 2}, {}, run_id=run_id,
                      spool_dir=str(tmp_path / "spool"), max_queue=50, close_timeout=90)
    half = len(records) // 2
    with Lines() as log:
        for record in records[:half]:
            getattr(sink, record["event"])(record)
        assert sink.flush(timeout=60)
        server.stop()
        for record in records[half:]:       # the server is gone: nothing blocks
            getattr(sink, record["event"])(record)
        assert not sink.flush(timeout=3)
        outage = sink.report()
        assert outage["pending_points"] > 50 and sink._points.on_disk > 0  # spilled beyond max_queue
        time.sleep(2)                       # ~5 s down in total, with retries failing
        server.start()
        report = sink.close("FINISHED")
    assert any("delivery failed" in line for line in log.lines)
    assert report["pending_points"] == 0 and report["pending_files"] == []
    assert list((tmp_path / "spool").iterdir()) == []  # the points it spilled went out: nothing left behind
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = expected_metrics(records)
    assert metric_histories(client, run_id, expected) == expected  # every point exactly once
    assert "weights/best.pt" in artifact_paths(client, run_id)


def test_close_while_unreachable_reports_and_keeps_data(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    records = list(record_stream(tmp_path / "save", run_id="orch-3", epochs=1, steps=5, ranks=(0,)))
    sink = MLflowSink(url, "proj", "down", {"epochs": 1}, {}, run_id="0" * 32, max_queue=4,
                      spool_dir=str(tmp_path / "spool"), close_timeout=3)
    with Lines() as log:
        for record in records:
            getattr(sink, record["event"])(record)
        report = sink.close("FAILED")
    assert report["pending_points"] == len([p for v in expected_metrics(records).values() for p in v])
    assert "results.csv" in report["pending_files"] and "weights/best.pt" in report["pending_files"]
    spool = report["spool_dir"]
    assert spool and any(p.suffix == ".jsonl" for p in (tmp_path / "spool").rglob("*"))
    assert any("not fully delivered" in line and spool in line for line in log.lines)
    assert sink.close("FAILED") == report  # idempotent


def test_create_run_unreachable_is_a_user_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"tracking_uri={url}"):
        create_run(url, "proj", "x", {}, {})


def test_probe_checks_tracking_uris_without_mlflow(tmp_path):
    """Ray runs leave creating the MLflow run to the callback actor; the driver probes first."""
    url = f"http://user:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match="MLflow: cannot reach tracking_uri=http://.*127.0.0.1") as err:
        probe_tracking_uri(url)
    assert "s3cret" not in str(err.value)
    assert probe_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}") and (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create the folder"):
        probe_tracking_uri(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
    with pytest.raises(UserError, match="names no host"):
        probe_tracking_uri("http:///api")
    assert probe_tracking_uri("postgresql://db:5432/mlflow") is False  # only MLflow can check this one


def test_sink_without_run_id_creates_and_reattaches(server, tmp_path):
    """A restarted actor re-creates the sink from the same args: it must find the same run."""
    records = list(record_stream(tmp_path / "save", run_id="orch-4", epochs=1, steps=3, ranks=(0,)))
    parent = create_run(server.url, "proj", "sweep", {}, {})
    args = (server.url, "proj", "lazy", {"a": 1}, {})
    first = MLflowSink(*args, parent_run_id=parent, event_log=False)
    for record in records[:5]:
        getattr(first, record["event"])(record)
    assert first.flush(timeout=60)
    again = pickle.loads(pickle.dumps(MLflowSink(*args, parent_run_id=parent, event_log=False)))
    for record in records:
        getattr(again, record["event"])(record)
    report = again.close("KILLED")
    assert report["run_id"] == first.report()["run_id"]
    client = MlflowClient(server.url)
    assert client.get_run(report["run_id"]).info.status == "KILLED"
    assert client.get_run(report["run_id"]).data.tags["mlflow.parentRunId"] == parent
    expected = expected_metrics(records)
    assert metric_histories(client, report["run_id"], expected) == expected


def test_replay_into_second_server_matches(servers, tmp_path):
    source, target = servers
    records = list(record_stream(tmp_path / "save", run_id="orch-5", epochs=2, steps=5))
    store = tmp_path / "store"
    sink = MLflowSink(source.url, "proj", "orig", {"epochs": 2}, {}, event_log=False)
    log = EventLogSink(str(store), "orch-5", max_rows=17)
    for record in records:
        getattr(sink, record["event"])(record)
        getattr(log, record["event"])(record)
    original = sink.close("FINISHED")["run_id"]
    log.close("FINISHED")

    new_id = replay_run(str(store), "orch-5", target.url)
    src, dst = MlflowClient(source.url), MlflowClient(target.url)
    keys = src.get_run(original).data.metrics.keys()
    assert set(dst.get_run(new_id).data.metrics) == set(keys)
    assert metric_histories(dst, new_id, keys) == metric_histories(src, original, keys)
    assert dst.get_run(new_id).info.status == "FINISHED"
    assert dst.get_experiment(dst.get_run(new_id).info.experiment_id).name == "replay"


def test_secrets_never_reach_params_tags_artifacts_or_logs(server, tmp_path, monkeypatch):
    aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY42"
    password = "s3cr3t-Passw0rd"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    config = {"epochs": 1, "password": password, "db": {"url": f"postgresql://me:{password}@db/x"},
              "note": f"uses {aws_secret}", "storage": "s3://bucket/prefix"}
    tags = {"creds": aws_secret, "owner": "me"}
    records = list(record_stream(tmp_path / "save", run_id="orch-6", epochs=1, steps=3, ranks=(0,),
                                 config=config))
    with Lines() as log:
        run_id = create_run(server.url, "proj", "secrets", config, tags)
        sink = MLflowSink(server.url, "proj", "secrets", config, tags, run_id=run_id)
        for record in records:
            getattr(sink, record["event"])(record)
        LOGGER.info(f"config password is {password}, key {aws_secret}")  # a careless log line
        report = sink.close("FINISHED")
    assert report["pending_files"] == []
    run = MlflowClient(server.url).get_run(run_id)
    assert run.data.params["password"] == MASK and run.data.params["storage"] == "s3://bucket/prefix"
    visible = [*run.data.params.values(), *run.data.params.keys(), *run.data.tags.values()]
    assert not [v for v in visible if password in v or aws_secret in v]
    files = [p for p in (server.root / "artifacts").rglob("*") if p.is_file() and run_id in str(p)]
    assert {p.name for p in files} >= {"args.yaml", "best.pt"}
    for path in files:
        data = path.read_bytes()
        assert password.encode() not in data and aws_secret.encode() not in data, path
    assert log.lines and not [line for line in log.lines if password in line or aws_secret in line]
    server_log = server.log.read_text()
    assert password not in server_log and aws_secret not in server_log


def test_point_rejected_by_server_is_dropped_not_blocking(server, tmp_path):
    records = list(record_stream(tmp_path / "save", run_id="orch-7", epochs=1, steps=4, ranks=(0,)))
    sink = MLflowSink(server.url, "proj", "poison", {}, {}, event_log=False, upload_artifacts=False)
    feed_half = len(records) // 2
    for record in records[:feed_half]:
        getattr(sink, record["event"])(record)
    sink._points.put(["bad(key)", 1.0, 1_700_000_000_000, 0])  # a name the server refuses
    for record in records[feed_half:]:
        getattr(sink, record["event"])(record)
    report = sink.close("FINISHED")
    assert report["rejected_points"] == 1 and report["pending_points"] == 0 and report["status"] == "FINISHED"
    expected = expected_metrics(records)
    assert metric_histories(MlflowClient(server.url), report["run_id"], expected) == expected


@pytest.mark.parametrize("via", ["records", "batches"])
def test_per_step_points_every_n_steps_once_per_step(server, tmp_path, via):
    """Two batches per optimizer step (nbs = 2 * batch), log_every_n_steps=3: one point at steps
    0, 3, 6, ..., the first batch that reached each; epoch metrics are untouched."""
    from callbacks.records import make_record

    run_id = create_run(server.url, "proj", "every-n", {}, {})
    sink = MLflowSink(server.url, "proj", "every-n", {}, {}, run_id=run_id, log_every_n_steps=3,
                      spool_dir=str(tmp_path / "spool"), event_log=False)
    t0, seq, sent = time.time(), 0, []
    for batch in range(20):
        step = (batch + 1) // 2  # the optimizer steps after every second batch
        sent.append(make_record(run_id="orch-n", event="on_train_batch_end", rank=0, attempt=0, seq=seq,
                                epoch=0, step=step, metrics={"train/loss": 1.0 / (batch + 1)}, now=t0 + batch))
        seq += 1
    end = make_record(run_id="orch-n", event="on_fit_epoch_end", rank=0, attempt=0, seq=seq,
                      epoch=0, step=10, metrics={"train/loss": 0.1}, now=t0 + 30)
    if via == "records":
        for record in [*sent, end]:
            getattr(sink, record["event"])(record)
    else:
        feed_as_batches([sink], [*sent, end], batch=7)
    assert sink.close("FINISHED")["pending_points"] == 0
    history = sorted((m.step, m.value) for m in MlflowClient(server.url).get_metric_history(run_id, "step/train/loss"))
    first = {}
    for r in sent:
        first.setdefault(r["step"], r["metrics"]["train/loss"])
    assert history == [(s, v) for s, v in sorted(first.items()) if s % 3 == 0] and len(history) == 4
    epoch = MlflowClient(server.url).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in epoch] == [(0, 0.1)]
    with pytest.raises(ValueError, match="log_every_n_steps"):
        MLflowSink(server.url, "proj", "bad", {}, {}, log_every_n_steps=0)


def test_event_log_parts_encoded_once_for_both_destinations(server, tmp_path, monkeypatch):
    """Beside an event-log sink (as the callback actor holds them) the MLflow sink uploads that
    sink's parts: each part is encoded once and lands in the bucket and in ``events/`` alike."""
    from callbacks.sinks import ObjectStore, event_parts
    from callbacks.sinks.event_log import run_prefix

    encoded, encode = [], event_parts.to_parquet
    monkeypatch.setattr(event_parts, "to_parquet", lambda table: encoded.append(table.num_rows) or encode(table))
    records = list(record_stream(tmp_path / "save", run_id="orch-8", epochs=2, steps=5))
    run_id = create_run(server.url, "proj", "shared-parts", {}, {})
    sink = MLflowSink(server.url, "proj", "shared-parts", {}, {}, run_id=run_id, upload_artifacts=False)
    log = EventLogSink(str(tmp_path / "store"), "orch-8")
    feed_as_batches([sink, log], records, batch=5)
    assert sink.close("FINISHED")["pending_files"] == []  # closed first, as in a run: its last parts too
    assert log.close("FINISHED")["pending_parts"] == []
    keys = ObjectStore.from_uri(str(tmp_path / "store")).list(run_prefix("orch-8"))
    stored = sorted(key.rsplit("/", 1)[-1] for key in keys)
    logged = sorted(p.split("/", 1)[1] for p in artifact_paths(MlflowClient(server.url), run_id)
                    if p.startswith("events/"))
    assert stored == logged and len(stored) >= 3
    assert len(encoded) == len(stored) and sum(encoded) == len(records)


def test_each_step_is_logged_once_per_lineage_and_a_clone_begins_a_new_one(tmp_path):
    """Points a restart repeats (a step its key already has) are not sent again, in a sweep trial's
    child run as in a training run; an ``on_clone`` record (PBT started the trial from another
    trial's earlier checkpoint) begins a new lineage, whose epochs are logged again; a sink that
    attaches later (a restarted actor, a resume) finds the floors of the lineage in the run."""
    from callbacks.records import driver_record, make_record

    uri = mlflow_store(tmp_path / "mlflow.db")
    parent = create_run(uri, "lineage", "sweep")
    clock = iter(range(1, 10_000))

    def train(sink, run, attempt: int, epochs, fitness) -> None:
        """Rank 0 of one worker group: two optimizer steps an epoch, then the epoch's record."""
        for epoch, value in zip(epochs, fitness):
            for step in (2 * epoch + 1, 2 * epoch + 2):
                sink.handle("on_train_batch_end", make_record(
                    run_id=run, event="on_train_batch_end", rank=0, attempt=attempt, seq=0, epoch=epoch,
                    step=step, metrics={"loss": 10 * attempt + step}, now=next(clock)))
            sink.handle("on_fit_epoch_end", make_record(
                run_id=run, event="on_fit_epoch_end", rank=0, attempt=attempt, seq=0, epoch=epoch,
                step=2 * epoch + 2, metrics={"fitness": value}, now=next(clock)))

    def history(run_id: str, key: str) -> list:
        points = MlflowClient(uri).get_metric_history(run_id, key)
        return [(m.step, m.value) for m in sorted(points, key=lambda m: m.timestamp)]

    for run, parent_run_id in (("plain", None), ("trial", parent)):
        sink = MLflowSink(uri, "lineage", run, parent_run_id=parent_run_id, event_log=False,
                          spool_dir=str(tmp_path / "spool"))
        train(sink, run, 1, [0, 1], [0.1, 0.2])
        train(sink, run, 2, [1, 2], [0.25, 0.3])  # restarted from epoch 0's checkpoint: epoch 1 again
        sink.handle("on_clone", {**driver_record(run, "on_clone", 0, 1, {}, attempt=3), "time": next(clock)})
        train(sink, run, 4, [1], [0.5])  # from another trial's checkpoint of epoch 0
        assert sink.flush(timeout=30)  # then the callback actor dies
        again = MLflowSink(uri, "lineage", run, event_log=False, spool_dir=str(tmp_path / "spool"))
        train(again, run, 5, [1, 2], [0.55, 0.6])  # restarted from the clone's epoch 0: epoch 1 again
        assert again.close("FINISHED")["status"] == "FINISHED"
        run_id = again.report()["run_id"]
        assert run_id == sink.report()["run_id"] and run_ids(uri, "lineage", run) == [run_id]
        assert history(run_id, "fitness") == [(0, 0.1), (1, 0.2), (2, 0.3), (1, 0.5), (2, 0.6)], run
        assert history(run_id, "step/loss") == [(s, 10 + s) for s in (1, 2, 3, 4)] + [(5, 25), (6, 26)] \
            + [(3, 43), (4, 44), (5, 55), (6, 56)], run
        assert MlflowClient(uri).get_run(run_id).data.tags.get("mlflow.parentRunId") == parent_run_id


def run_ids(uri: str, experiment: str, orch_run_id: str) -> list[str]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              f"tags.`orchestrator.run_id` = '{orch_run_id}'")
    return [r.info.run_id for r in runs]


def test_a_pbt_note_of_the_driver_waits_out_an_outage_and_is_one_point_and_tag_per_number(server, tmp_path):
    """A sweep driver's ``on_hparams`` record (``hparams_record``), sent twice while MLflow is down:
    journaled once, then each number is a point ``hparam/<key>`` at the record's epoch and a tag
    ``hparam.<key>`` once MLflow answers, and every changed value, strings and booleans too, is in
    the run's artifact ``hparams-epoch-<epoch>.yaml``."""
    from callbacks.dispatcher import Dispatcher
    from callbacks.journal import Journal
    from sweeps.state import hparams_record
    from tests.servers import TcpProxy

    with TcpProxy(server.port) as proxy:
        proxy.cut()
        sink = MLflowSink(proxy.url, "pbt", "trial", {"lr0": 0.01, "batch": 8}, {}, event_log=False)
        dispatcher = Dispatcher([sink], journal=Journal(tmp_path / "journal", "orch-h"))
        dispatcher.start()
        changed = {"lr0": 0.05, "batch": 16, "optimizer": "AdamW", "cos_lr": True}
        record = hparams_record("orch-h", 0, 2, changed, tmp_path / "trial")
        for _ in range(2):  # sent again: a restarted actor, an uncertain failure
            dispatcher.ingest([record], {("orch-h", -1, 0): 0})
        assert not sink.flush(timeout=3) and sink.report()["pending_points"] == 2
        proxy.restore()
        report = dispatcher.finish("FINISHED")
    assert report["dispatched"] == 1 and report["duplicates"] == 1
    client, run_id = MlflowClient(server.url), report["sinks"]["MLflowSink"]["run_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "hparam/lr0")] == [(2, 0.05)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "hparam/batch")] == [(2, 16.0)]
    tags, params = client.get_run(run_id).data.tags, client.get_run(run_id).data.params
    assert (tags["hparam.lr0"], tags["hparam.batch"], params["lr0"]) == ("0.05", "16", "0.01")
    assert not any(key.startswith(("hparam/optimizer", "hparam/cos_lr")) for key in client.get_run(run_id).data.metrics)
    noted = Path(client.download_artifacts(run_id, "hparams-epoch-2.yaml", str(tmp_path / "got")))
    assert yaml.safe_load(noted.read_text()) == changed
