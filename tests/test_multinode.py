"""Ranks on other nodes than the driver, with the object store cut for 30 s mid-run: every rank's
records reach the event log, in order, none missing or twice; the files rank 0's records name still
reach the sinks; each node's system metrics (the three training nodes', and the head's, where the
callback actor samples its own node) reach the run under the node's name; training never waited
for S3.

tests/multinode_run.py runs one tiny detection run on a Ray cluster of four raylets on this machine
(the driver on the head, one rank on each of three other nodes) with S3 storage (moto over HTTP,
unreachable for 30 s from rank 0's epoch 1) and MLflow on SQLite.
"""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from callbacks.system_metrics import node_label
from tests.helpers import artifact_paths, run_cluster_script

RANKS = 3


def test_three_remote_ranks_ride_out_a_30s_s3_outage_and_every_record_and_file_reaches_the_sinks(tmp_path):
    """S3 cut from the start of epoch 1 for 30 s: the ranks train on (every later epoch starts
    before S3 is back; Ray Train's checkpoint upload waits, off the step loop), the run finishes with
    one attempt per rank, every record stored once in order, each epoch metric once in MLflow, and
    rank 0's files in the store and in MLflow."""
    out, result = run_cluster_script("multinode_run.py", tmp_path)
    marks = result["marks"]
    assert marks["restored"] - marks["cut"] >= 30
    assert all(marks["cut"] <= marks[f"epoch{e}"] < marks["restored"] for e in (2, 3)), marks
    assert "checkpoint upload to" in out.stdout + out.stderr  # the outage was met, and waited out
    nodes = result["rank_nodes"]
    assert sorted(nodes) == [f"rank{r}" for r in range(RANKS)]
    assert sorted(nodes.values()) == sorted(result["worker_nodes"])  # one rank per node
    assert result["driver_node"] not in nodes.values()

    # Every rank's records, raw (every stored row): one attempt, seq 0..n-1 once each, the fit's events.
    streams = result["streams"]
    assert sorted(int(key.split("/")[0]) for key in streams) == list(range(RANKS)), sorted(streams)
    for key, rows in streams.items():
        assert [seq for seq, _ in rows] == list(range(len(rows))), f"rank/attempt {key}: seqs stored"
        events = [event for _, event in rows]
        assert events[0] == "on_pretrain_routine_start" and events[-1] == "teardown", key
        assert events.count("on_fit_epoch_end") == 5, key  # 4 epochs and the final evaluation
        assert events.count("on_train_batch_end") == 8 * events.count("on_train_epoch_start") > 0, key
    assert "not found on the driver" not in out.stdout + out.stderr

    # Records name rank 0's files by their URI in the shared store, not by a worker-local path.
    files = f"s3://multinode/store/runs/{result['run_id']}/files/rank0/"
    end = next(r for r in result["records"] if r["event"] == "on_train_end")
    assert {"results.csv", "args.yaml", "best", "results.png"} <= set(end["artifacts"])
    assert all(uri.startswith(files) for uri in end["artifacts"].values()), end["artifacts"]
    keys = set(result["keys"])
    assert {f"runs/{result['run_id']}/weights/best.pt", f"runs/{result['run_id']}/weights/last.pt"} <= keys

    # The driver-side MLflow sink fetched them; every epoch metric once (raw: a point logged twice shows).
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("runs").experiment_id])[0]
    assert run.info.status == "FINISHED"
    paths = set(artifact_paths(client, run.info.run_id))
    assert {"results.csv", "args.yaml", "results.png", "weights/best.pt"} <= paths, paths
    assert Path(result["loaded"]).name == "best.pt"  # Model.train loaded best.pt through the store
    epoch_keys = [key for key in run.data.metrics if not key.startswith(("step/", "system/", "final/"))]
    assert {"fitness", "metrics/mAP50B", "train/box_loss", "lr/pg0"} <= set(epoch_keys), epoch_keys
    for key in epoch_keys:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2, 3], key
    # each training node sampled itself into the run, under its own name; the callback actor its own
    nodes = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
    assert nodes == {node_label(node) for node in [*result["worker_nodes"], result["driver_node"]]}, nodes
