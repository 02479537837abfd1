"""Many ranks into one callback actor (issue 18): the event log keeps every rank's records at full
fidelity, MLflow keeps rank 0's series at the configured cadence.

64 simulated ranks of a detection run (``benchmarks/scale.py``: a real ``EventForwarder`` each, the
events and fields a detection fit gives them, values that differ by rank) fire, in this process, into
a real callback actor with a durable journal, the MLflow sink on a SQLite store, the event log and
checkpoints in a local store. Counts are taken on the raw event-log rows, never after de-duplication.
"""
from __future__ import annotations

from collections import defaultdict

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from benchmarks.scale import rank0_series, rank_script, run_ranks, run_sinks, step_metrics, write_rank0_files
from callbacks.actor import start_callback_actor
from callbacks.journal import Journal
from callbacks.sinks import read_event_log

RANKS, EVERY = 64, 5  # world size; log_every_n_steps
PLAN = dict(epochs=2, steps=10, val_batches=2)
RUN = "scale-test"


@pytest.fixture(scope="module")
def scaled_run(ray_session, tmp_path_factory):
    """One run of RANKS ranks through the actor, finished; (folder, forwarders' counts, report)."""
    folder = tmp_path_factory.mktemp("scale")
    sinks = run_sinks(folder, RUN, PLAN["epochs"], EVERY)
    actor = start_callback_actor(sinks, journal=Journal(folder / "journal", RUN))
    counts = run_ranks(actor, RUN, list(range(RANKS)), PLAN, rate=None, files=write_rank0_files(folder / "rank0"))
    report = ray_session.get(actor.finish.remote("FINISHED"))
    ray_session.kill(actor)
    return folder, counts, report


def test_event_log_has_every_record_of_every_rank_once_in_order(scaled_run):
    folder, counts, report = scaled_run
    table = read_event_log(str(folder / "store"), RUN, dedup_rows=False)  # raw: every stored row
    stored = defaultdict(list)
    for row in table.select(["rank", "attempt", "seq", "event", "step", "metrics"]).to_pylist():
        stored[row["rank"]].append(row)
    assert sorted(stored) == list(range(RANKS))
    for rank, rows in stored.items():
        script = rank_script(rank, **PLAN)
        assert [r["seq"] for r in rows] == list(range(len(script))), f"rank {rank}: seqs stored"
        assert [(r["event"], r["step"]) for r in rows] == [(event, step) for event, _, step, _ in script]
        assert {r["attempt"] for r in rows} == {0}
        ends = [r for r in rows if r["event"] == "on_train_batch_end"]
        assert all(dict(r["metrics"]) == step_metrics(rank, r["step"]) for r in ends), f"rank {rank}: step metrics"
    emitted = sum(len(rank_script(rank, **PLAN)) for rank in range(RANKS))
    assert table.num_rows == emitted == counts["records"] == report["dispatched"]
    assert counts["lost"] == 0 and report["failures"] == []


def test_a_cut_of_every_rank_is_one_part_in_the_store_and_in_mlflow(scaled_run):
    """A part per cut (the epochs, the final evaluation, the rest at close, maybe cuts by age on a
    slow machine), holding every rank's rows: a part per rank per cut made ~N files a cut, each
    also an MLflow artifact."""
    folder, _, _ = scaled_run
    paths = sorted((folder / "store").glob(f"events/run_id={RUN}/part-*.parquet"))
    assert 1 <= len(paths) <= PLAN["epochs"] + 4, [p.name for p in paths]
    ranks = [set(pq.ParquetFile(p).read(columns=["rank"]).column("rank").to_pylist()) for p in paths]
    assert max(map(len, ranks)) == RANKS, ranks
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("scale").experiment_id])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "events")) == [f"events/{p.name}" for p in paths]


def test_mlflow_has_rank0_series_at_the_cadence_once(scaled_run):
    folder, _, report = scaled_run
    assert report["sinks"]["MLflowSink"]["pending_points"] == 0
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("scale").experiment_id])
    assert run.info.status == "FINISHED"
    stored = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
              for key in run.data.metrics}
    expected = rank0_series(PLAN, EVERY)
    assert sorted(stored) == sorted(expected)
    for key, points in expected.items():  # one point per step, and rank 0's value (ranks differ by >= 1)
        assert [step for step, _ in stored[key]] == [step for step, _ in points], key
        assert [value for _, value in stored[key]] == pytest.approx([value for _, value in points]), key
