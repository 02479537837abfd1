"""Throughput of the driver-side sinks against real servers.

1. Metric points/s through MLflowSink (records in, delivered and acknowledged out) vs. a raw
   ``MlflowClient.log_batch`` loop of 1000-metric batches, against the same `mlflow server`
   (SQLite store) in one run. Prints the ratio; the target is >= 0.9.
2. Event-log rows/s from EventLogSink to a local directory and to a moto S3 server.

Usage: python benchmarks/mlflow_sink.py [--points 60000] [--rounds 2]

``--tiny`` runs the same code path end to end against the same servers (started here, as in the
full mode) with a few hundred points and rows, one round (seconds, for the tests): its figures are
not measurements.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import MlflowServer, MotoServer  # noqa: E402

import tiny  # noqa: E402
from callbacks.records import make_record  # noqa: E402
from callbacks.sinks import EventLogSink, MLflowSink  # noqa: E402

METRICS = ("train/box_loss", "train/cls_loss", "train/dfl_loss", "lr/pg0", "lr/pg1", "lr/pg2")
EVENT_ROWS = 120_000  # event-log points per rank (rows: this / len(METRICS) per rank)
TINY_POINTS, TINY_EVENT_ROWS = 600, 1_200


def records(n_points: int, run_id: str = "bench", ranks=(0,)) -> list[dict]:
    """Per-step records with len(METRICS) metrics each, ``n_points`` points per rank in total."""
    t0 = time.time()
    out = []
    for step in range(n_points // len(METRICS)):
        for rank in ranks:
            out.append(make_record(run_id=run_id, event="on_train_batch_end", rank=rank, attempt=0,
                                   seq=step, epoch=0, step=step, now=t0 + step * 1e-3,
                                   metrics={k: 1.0 / (step + 1) + i for i, k in enumerate(METRICS)}))
    return out


def raw_loop(url: str, recs: list[dict]) -> float:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(exp.experiment_id, run_name="raw").info.run_id
    start = time.perf_counter()
    batch = []
    for r in recs:
        ts = int(r["time"] * 1000)
        batch.extend(Metric("step/" + k, v, ts, r["step"]) for k, v in r["metrics"].items())
        while len(batch) >= 1000:
            client.log_batch(run_id, metrics=batch[:1000], synchronous=True)
            batch = batch[1000:]
    if batch:
        client.log_batch(run_id, metrics=batch, synchronous=True)
    return time.perf_counter() - start


def sink_loop(url: str, recs: list[dict], spool: str) -> float:
    sink = MLflowSink(url, "bench", "sink", params={"points": len(recs)}, tags={}, spool_dir=spool,
                      find_existing=False)  # a new run each round, as the raw loop makes
    sink.flush()  # nothing to send yet: starts the delivery thread like the actor's first record
    start = time.perf_counter()
    for r in recs:
        sink.on_train_batch_end(r)
    assert sink.flush(timeout=600), sink.report()
    elapsed = time.perf_counter() - start
    report = sink.close("FINISHED")
    assert report["pending_points"] == 0 and report["delivered_points"] == len(recs) * len(METRICS), report
    return elapsed


def event_log_rate(store_uri: str, recs: list[dict]) -> float:
    sink = EventLogSink(store_uri, f"bench-{time.time_ns()}", max_rows=20_000)
    start = time.perf_counter()
    for r in recs:
        sink.on_train_batch_end(r)
    report = sink.close("FINISHED")
    elapsed = time.perf_counter() - start
    assert not report["pending_parts"], report
    return len(recs) / elapsed


def _join(values: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.set_defaults(event_points=EVENT_ROWS)
    args = tiny.parse(ap, f"{TINY_POINTS} points, one round, seconds", points=TINY_POINTS, rounds=1,
                      event_points=TINY_EVENT_ROWS)
    recs = records(args.points)
    n = len(recs) * len(METRICS)
    with tempfile.TemporaryDirectory() as tmp, MlflowServer(Path(tmp) / "mlflow") as server:
        raw, sink = [], []
        for _ in range(args.rounds):  # interleaved, best of each: the machine is shared
            raw.append(n / raw_loop(server.url, recs))
            sink.append(n / sink_loop(server.url, recs, str(Path(tmp) / "spool")))
        print(f"mlflow raw log_batch loop : {max(raw):9.0f} points/s  (rounds: {_join(raw)})")
        print(f"mlflow through MLflowSink : {max(sink):9.0f} points/s  (rounds: {_join(sink)})")
        print(f"ratio sink/raw            : {max(sink) / max(raw):9.2f}  (target >= 0.9)")

    events = records(args.event_points, ranks=(0, 1))
    with tempfile.TemporaryDirectory() as tmp:
        print(f"event log -> local dir    : {event_log_rate(str(Path(tmp) / 'store'), events):9.0f} rows/s")
        with MotoServer(Path(tmp) / "moto") as moto:
            os.environ.update(moto.client_env())
            moto.create_bucket("bench")
            print(f"event log -> moto S3      : {event_log_rate('s3://bench/events', events):9.0f} rows/s")
    tiny.end(args)


if __name__ == "__main__":
    main()
