"""Object storage, event log and checkpoint sinks against a local dir and a real moto S3 server.

The S3 endpoint is reached through a TCP proxy on 127.0.0.1 that the outage tests cut and
restore: moto keeps its buckets in memory, so the server itself must stay up.
"""
from __future__ import annotations

import io
import itertools
import pickle
import time

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from callbacks.sinks import (EVENT_SCHEMA, CheckpointSink, EventLogSink, ObjectStore, checkpoint_key,
                             read_event_log)
from callbacks.sinks.event_log import run_prefix
from callbacks.sinks.s3 import S3Setup
from tests.helpers import feed_as_batches
from tests.servers import MotoServer, TcpProxy, record_stream
from trainers.utils import UserError

BUCKET = "orchestrator-test"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def proxy(moto, monkeypatch):
    """The S3 endpoint as clients see it (through the proxy); AWS env points there."""
    with TcpProxy(moto.port) as p:
        for key, value in moto.client_env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("proxy")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def feed(sink, records):
    for record in records:
        getattr(sink, record["event"])(record)


def test_object_store_roundtrip(store_uri, tmp_path):
    store = pickle.loads(pickle.dumps(ObjectStore.from_uri(store_uri)))
    store.check()
    assert store.uri("a/b.txt").endswith("a/b.txt")
    store.put_bytes("a/b.txt", b"hello")
    store.put_bytes("a/b.txt", b"hello again")  # same key: rewrite, no duplicate
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (17 * 4096 + 3))  # > 16 MiB: multipart on S3
    store.put_file("c/big.bin", big)
    assert store.get_bytes("a/b.txt") == b"hello again"
    assert store.get_bytes("c/big.bin") == big.read_bytes()
    assert store.exists("a/b.txt") and not store.exists("a/missing.txt")
    assert store.list() == ["a/b.txt", "c/big.bin"]
    assert store.list("a/") == ["a/b.txt"]
    if store_uri.startswith("s3://"):
        head = store.client.head_object(Bucket=BUCKET, Key=store._key("c/big.bin"))
        assert "-" in head["ETag"]  # uploaded in parts
    with pytest.raises(ValueError, match="bad object key"):
        store.put_bytes("../escape", b"x")


def test_bad_storage_uris_are_user_errors(proxy):
    with pytest.raises(UserError, match="unsupported URI scheme 'gs'"):
        ObjectStore.from_uri("gs://bucket/x")
    with pytest.raises(UserError, match="no-such-bucket"):
        ObjectStore.from_uri("s3://no-such-bucket/x").check()


@pytest.mark.parametrize("via", ["records", "batches"])
def test_event_log_roundtrip_one_schema(store_uri, tmp_path, via):
    records = list(record_stream(tmp_path / "save", run_id="run-a", epochs=2, steps=7))
    sink = pickle.loads(pickle.dumps(EventLogSink(store_uri, "run-a", max_rows=9,
                                                  spool_dir=str(tmp_path / "spool"))))
    if via == "records":
        feed(sink, records)
    else:  # workers' batches through the actor's in-order path: rows taken whole
        feed_as_batches([sink], records, batch=4)
    # an actor restart re-sends the last records: the log keeps one row per (rank, attempt, seq)
    again = EventLogSink(store_uri, "run-a", max_rows=5)
    feed(again, records[-12:])
    assert sink.close("FINISHED")["pending_parts"] == []
    assert again.close("FINISHED")["pending_parts"] == []

    store = ObjectStore.from_uri(store_uri)
    keys = store.list(run_prefix("run-a"))
    assert len(keys) > 4 and all(k.split("/")[-1].startswith("part-") for k in keys)
    for key in keys:  # every part has the one schema
        assert pq.read_schema(io.BytesIO(store.get_bytes(key))).remove_metadata() == EVENT_SCHEMA
    table = read_event_log(store_uri, "run-a")
    assert table.num_rows == len(records)
    rows = table.to_pylist()
    assert {r["run_id"] for r in rows} == {"run-a"}
    got = {(r["rank"], r["seq"]): r for r in rows}
    for rec in records:
        row = got[(rec["rank"], rec["seq"])]
        assert (row["event"], row["step"], row["epoch"], row["time"], row["final_eval"]) == \
            (rec["event"], rec["step"], rec["epoch"], rec["time"], rec["final_eval"])
        assert dict(row["metrics"]) == rec["metrics"] and dict(row["artifacts"]) == rec["artifacts"]
    # plain pyarrow.dataset over the whole events/ tree works too (hive partitioning by run)
    fs, base = store.arrow_fs()
    whole = ds.dataset(f"{base}/events", filesystem=fs, format="parquet", partitioning="hive")
    assert whole.to_table(filter=ds.field("run_id") == "run-a").num_rows >= len(records)
    assert read_event_log(store_uri, "no-such-run").num_rows == 0


def test_event_log_batches_cut_on_batch_boundaries(store_uri, tmp_path):
    """Rows taken whole (journal entries) are cut after the batch that ends an epoch: as many
    parts as records one by one, each starting on a batch boundary (a sink restarted from its
    watermark cuts the same first part again), and the same rows."""
    records = list(record_stream(tmp_path / "save", run_id="run-b", epochs=3, steps=7, ranks=(0,)))
    one_by_one = EventLogSink(f"{store_uri}/one", "run-b")
    feed(one_by_one, records)
    batched = EventLogSink(f"{store_uri}/batched", "run-b")
    feed_as_batches([batched], records, batch=4)
    keys, tables = [], []
    for sink, folder in ((one_by_one, "one"), (batched, "batched")):
        assert sink.close("FINISHED")["pending_parts"] == []
        keys.append([k.rsplit("/", 1)[-1] for k in ObjectStore.from_uri(f"{store_uri}/{folder}").list(run_prefix("run-b"))])
        tables.append(read_event_log(f"{store_uri}/{folder}", "run-b"))
    assert len(keys[0]) == 5  # 3 epochs, the final evaluation, the rest at close
    ends = {(i // 4 + 1) * 4 for i, r in enumerate(records) if r["event"] == "on_fit_epoch_end"}
    firsts = sorted({0} | {end for end in ends if end < len(records)})  # cut after each batch with an epoch end
    assert keys[1] == [f"part-0-0-{first:09d}.parquet" for first in firsts]
    assert tables[0].equals(tables[1]) and tables[0].num_rows == len(records)


def test_a_cut_is_one_part_of_every_rank_and_a_restart_overwrites_it(tmp_path):
    """A cut holds every rank's rows (sorted by rank and seq), named after the first row it took.
    A sink restarted from its watermark (nothing of this run delivered) takes the same rows again
    and cuts elsewhere (fewer rows per part): its first part overwrites the part the first sink
    left, so every row is stored once (counted raw)."""
    from trainers.events import wire_row

    def batch(rank: int, first: int) -> list:
        return [wire_row("on_train_batch_end", 0, step, 1e9 + step, {"loss": float(rank)}, {}, False)
                for step in range(first, first + 2)]

    batches = [(("run-e", rank, 7), first) for first in range(0, 10, 2) for rank in (1, 0)]  # rank 1 first
    store = str(tmp_path / "store")
    crashed = EventLogSink(store, "run-e", max_rows=10)  # cuts after the fifth batch, then "dies"
    for stream, first in batches[:5]:
        crashed.handle_rows(stream, first, batch(stream[1], first))
    assert crashed.close("FINISHED")["pending_parts"] == []
    (left,) = ObjectStore.from_uri(store).list(run_prefix("run-e"))
    assert left.endswith("/part-1-7-000000000.parquet")
    assert [(r["rank"], r["seq"]) for r in pq.read_table(io.BytesIO(ObjectStore.from_uri(store).get_bytes(left)))
            .to_pylist()] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]

    restarted = EventLogSink(store, "run-e", max_rows=6)
    for stream, first in batches:
        restarted.handle_rows(stream, first, batch(stream[1], first))
    assert restarted.close("FINISHED")["pending_parts"] == []
    keys = ObjectStore.from_uri(store).list(run_prefix("run-e"))
    assert left in keys and len(keys) == 4  # 20 rows: 6 + 6 + 6 + 2
    raw = read_event_log(store, "run-e", dedup_rows=False).to_pylist()
    assert [(r["rank"], r["seq"]) for r in raw] == [(rank, seq) for rank in (0, 1) for seq in range(10)]


def test_event_log_drops_only_malformed_rows(tmp_path):
    """A row Arrow cannot convert costs that row (a warning), not the part it was cut into."""
    from trainers.events import make_row

    sink = EventLogSink(str(tmp_path / "store"), "run-c")
    good = [make_row("on_train_batch_end", {"epoch": 0, "step": i, "metrics": {"loss": 0.5}}) for i in range(6)]
    bad = ["on_train_batch_end", 0, "not-a-step", 0.0, {}, {}, False]
    sink.handle_rows(("run-c", 0, 0), 0, [*good[:3], bad, *good[3:]])
    assert sink.close("FINISHED")["pending_parts"] == []
    table = read_event_log(str(tmp_path / "store"), "run-c")
    assert table.column("seq").to_pylist() == [0, 1, 2, 4, 5, 6]
    assert table.column("step").to_pylist() == [0, 1, 2, 3, 4, 5]


def test_checkpoint_sink_uploads_latest_and_skips_unchanged(store_uri, tmp_path):
    sink = CheckpointSink(store_uri, "run-c", spool_dir=str(tmp_path / "spool"))
    saves = []
    for record in record_stream(tmp_path / "save", run_id="run-c", epochs=3, steps=2, ranks=(0,)):
        getattr(sink, record["event"])(record)   # files change between epochs, as in training
        if record["event"] == "on_model_save":
            saves.append(record)
            assert sink._courier.flush(30)
    assert sink.report()["uploads"] == 6
    feed(sink, saves[-1:])  # same files again: nothing new to upload
    report = sink.close("FINISHED")
    assert report["pending"] == [] and report["uploads"] == 6
    store = ObjectStore.from_uri(store_uri)
    for name in ("last", "best"):
        blob = store.get_bytes(checkpoint_key("run-c", name))
        ckpt = torch.load(io.BytesIO(blob), weights_only=True)
        assert ckpt["epoch"] == 2  # the latest one


def test_s3_outage_keeps_parts_and_checkpoints(proxy, tmp_path):
    uri = f"s3://{BUCKET}/outage-{time.time_ns()}"
    total = len(list(record_stream(tmp_path / "dry", run_id="run-o", epochs=3, steps=10)))
    stream = record_stream(tmp_path / "save", run_id="run-o", epochs=3, steps=10)
    log = EventLogSink(uri, "run-o", max_rows=10, spool_dir=str(tmp_path / "spool"), close_timeout=60)
    ckpt = CheckpointSink(uri, "run-o", spool_dir=str(tmp_path / "spool"), close_timeout=60)
    records = []

    def step(n):
        for record in itertools.islice(stream, n):
            records.append(record)
            getattr(log, record["event"])(record)
            getattr(ckpt, record["event"])(record)

    step(total // 3)
    proxy.cut()
    step(total // 3)                           # endpoint unreachable: queued locally
    time.sleep(3)
    assert log.report()["pending_parts"] and log.report()["last_error"]
    assert ckpt.report()["pending"]
    time.sleep(7)                              # ~10 s outage
    proxy.restore()
    step(total)
    assert len(records) == total
    assert log.close("FINISHED")["pending_parts"] == []
    assert ckpt.close("FINISHED")["pending"] == []
    assert list((tmp_path / "spool").iterdir()) == []  # both spool folders went with their last upload
    table = read_event_log(uri, "run-o")
    assert sorted(zip(table["rank"].to_pylist(), table["seq"].to_pylist())) == \
        sorted((r["rank"], r["seq"]) for r in records)
    store = ObjectStore.from_uri(uri)
    for name in ("last", "best"):
        ckpt_data = torch.load(io.BytesIO(store.get_bytes(checkpoint_key("run-o", name))), weights_only=True)
        assert ckpt_data["epoch"] == 2


def test_files_a_remote_rank_shipped_reach_the_sinks_when_the_store_was_down_at_dispatch(proxy, tmp_path):
    """Rank 0 on another node ships its files to the store, then its record names their URIs. If
    the store is down when the record is dispatched, the sinks fetch the files once it is back
    (fetched at dispatch, they were skipped: "not found on the driver")."""
    from mlflow.tracking import MlflowClient

    from callbacks.records import make_record
    from callbacks.sinks import MLflowSink
    from tests.servers import mlflow_store

    uri = f"s3://{BUCKET}/shipped-{time.time_ns()}"
    store = ObjectStore.from_uri(uri)
    files = {"results.csv": b"epoch,loss\n0,1.0\n", "last.pt": b"weights of epoch 0"}
    shipped = {name: store.put_bytes(f"runs/r/files/rank0/{name}", data) for name, data in files.items()}
    record = make_record(run_id="r", event="on_model_save", rank=0, attempt=0, seq=0, epoch=0, step=5,
                         artifacts={"results.csv": shipped["results.csv"], "last": shipped["last.pt"]})
    tracking = mlflow_store(tmp_path / "mlflow.db")
    ckpt = CheckpointSink(uri, "r", spool_dir=str(tmp_path / "spool"), close_timeout=60)
    mlflow = MLflowSink(tracking, "proj", "shipped", {}, {}, spool_dir=str(tmp_path / "spool"), event_log=False,
                        close_timeout=60)
    proxy.cut()
    for sink in (ckpt, mlflow):
        sink.on_model_save(record)
    time.sleep(3)
    assert ckpt.report()["pending"] == [checkpoint_key("r", "last")]
    assert mlflow.report()["pending_files"] == ["results.csv"]
    proxy.restore()
    assert ckpt.close("FINISHED")["pending"] == [] and mlflow.close("FINISHED")["pending_files"] == []
    assert store.get_bytes(checkpoint_key("r", "last")) == files["last.pt"]
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    local = client.download_artifacts(run.info.run_id, "results.csv", str(tmp_path))
    assert open(local, "rb").read() == files["results.csv"]


def test_close_during_outage_reports_where_parts_are(proxy, tmp_path):
    uri = f"s3://{BUCKET}/down-{time.time_ns()}"
    records = list(record_stream(tmp_path / "save", run_id="run-d", epochs=1, steps=3, ranks=(0,)))
    proxy.cut()
    log = EventLogSink(uri, "run-d", spool_dir=str(tmp_path / "spool"), close_timeout=2)
    feed(log, records)
    report = log.close("FAILED")
    assert report["pending_parts"] and report["spool_dir"]
    kept = [p for p in (tmp_path / "spool").rglob("*.parquet")]
    assert len(kept) == len(report["pending_parts"])
    assert sum(pq.read_table(p).num_rows for p in kept) == len(records)


def test_s3_config_keys_reach_boto3_pyarrow_and_ray_storage(moto, monkeypatch, tmp_path):
    """Endpoint, region and profile as config keys, no AWS variable naming them: one set-up for
    the store's boto3 client, its pyarrow reader and Ray Train's storage filesystem, and it
    survives pickling (sinks and shippers travel to the callback actor and the workers)."""
    from orchestrator.ray_launch import storage_for
    from trainers.config import ENV_VARS, get_cfg

    for name in [n for names in ENV_VARS.values() for n in names] + ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "credentials").write_text("[ci]\naws_access_key_id = ci\naws_secret_access_key = ci-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    args = get_cfg(None, {"storage": f"s3://{BUCKET}/keys", "s3_endpoint": moto.url, "s3_region": "eu-west-1",
                          "s3_profile": "ci"})
    s3 = S3Setup.of(args)
    store = pickle.loads(pickle.dumps(ObjectStore.from_uri(args.storage, s3)))
    store.put_bytes("boto3.txt", b"via boto3")
    assert (store.client.meta.endpoint_url, store.client.meta.region_name) == (moto.url, "eu-west-1")
    fs, base = store.arrow_fs()
    assert fs.open_input_stream(f"{base}/boto3.txt").read() == b"via boto3"
    path, ray_fs = storage_for(args.storage, s3)
    with pickle.loads(pickle.dumps(ray_fs)).open_output_stream(f"{path}/pyarrow.txt") as out:
        out.write(b"via pyarrow")
    assert store.get_bytes("ray/pyarrow.txt") == b"via pyarrow"
    with pytest.raises(UserError, match="AWS profile 'nope'"):
        ObjectStore.from_uri(args.storage, S3Setup(moto.url, profile="nope")).check()
    with pytest.raises(UserError, match="s3_endpoint"):
        S3Setup.of(get_cfg(None, {"s3_endpoint": "127.0.0.1:9000"}))


def test_a_cut_due_as_rows_arrive_is_encoded_off_the_callers_thread_in_order():
    """The callback actor adds rows with its dispatcher's lock held: a cut due then is only set
    aside, and the parts' own thread hands out each cut's parts, then its journal mark, oldest cut
    first; ``close`` encodes the rest on the caller's thread and ends that thread."""
    import threading

    from callbacks.sinks.event_parts import EventParts, part_key
    from trainers.events import wire_row

    def rows(first: int, n: int) -> list:
        return [wire_row("on_train_batch_end", 0, step, 1e9 + step, {"loss": 1.0}, {}, False)
                for step in range(first, first + n)]

    parts, seen, caller = EventParts("r", max_rows=10), [], threading.current_thread().name
    encoded = threading.Semaphore(0)
    parts.subscribe(lambda key, data: seen.append(("part", threading.current_thread().name, key)))
    parts.watch(lambda mark, keys: (seen.append(("mark", threading.current_thread().name, mark, keys)),
                                    encoded.release()))
    parts.encode_in_background()
    with parts._encoding:  # hold the encoder back: both cuts wait, set aside
        parts.add_rows(("r", 0, 1), 0, rows(0, 10), mark=1)  # 10 rows: a cut is due
        parts.add_rows(("r", 0, 1), 10, rows(10, 12), mark=2)
        assert seen == [] and parts.rows == 0  # nothing encoded by the caller
    assert encoded.acquire(timeout=30) and encoded.acquire(timeout=30)
    first, second = part_key("r", 0, 1, 0), part_key("r", 0, 1, 10)
    assert seen == [("part", "event-parts", first), ("mark", "event-parts", 1, [first]),
                    ("part", "event-parts", second), ("mark", "event-parts", 2, [second])]
    assert parts.rows == 22
    parts.add_rows(("r", 0, 1), 22, rows(22, 3), mark=3)  # not due
    parts.close()
    third = part_key("r", 0, 1, 22)
    assert seen[-2:] == [("part", caller, third), ("mark", caller, 3, [third])]
    parts._encoder.join(5)
    assert not parts._encoder.is_alive()


def test_the_background_encoder_of_parts_dropped_unclosed_ends(monkeypatch):
    import gc

    from callbacks.sinks import event_parts
    from trainers.events import wire_row

    monkeypatch.setattr(event_parts, "ENCODER_IDLE_S", 0.1)
    parts = event_parts.EventParts("r", max_rows=2)
    parts.encode_in_background()
    parts.add_rows(("r", 0, 1), 0, [wire_row("on_train_batch_end", 0, s, 1e9, {}, {}, False) for s in range(2)])
    encoder = parts._encoder
    del parts
    gc.collect()
    encoder.join(5)
    assert not encoder.is_alive()
