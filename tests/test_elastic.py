"""Elastic runs (``num_workers`` a range): the config forms, and runs that Ray resizes mid-run.

tests/elastic_run.py runs ``num_workers=1-2`` on a cluster with room for one worker, then adds a
node in epoch 1: the run finishes on two workers, ``on_resize`` fired on both ranks, and MLflow has
each epoch's metrics once. Its ``shrink`` scenario starts the same range on two nodes and removes
rank 1's in epoch 1: the run finishes on one worker from epoch 0's checkpoint, the same way.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from callbacks.sinks import read_event_log
from orchestrator.ray_launch import scaling_config
from orchestrator.run_setup import run_description, run_tags
from trainers.config import get_cfg, parse_overrides
from trainers.engine.setup import split_batch
from trainers.utils import UserError
from tests.helpers import run_cluster_script



@pytest.mark.parametrize("given", ["2-4", [2, 4], " 2 - 4 "])
def test_a_range_is_kept_as_written_and_makes_an_elastic_scaling_config(given):
    args = get_cfg(overrides={"num_workers": given})
    assert args.num_workers == "2-4"
    assert scaling_config(args).num_workers == (2, 4) and scaling_config(args).elastic_resize_monitor_interval_s == 60
    assert run_tags(args)["world_size"] == "2-4" and "- world size: 2-4 (2-4 Ray Train worker(s) on CPU)" in \
        run_description(args)


def test_a_count_stays_a_count():
    assert get_cfg(overrides=parse_overrides(["num_workers=3"])).num_workers == 3
    assert get_cfg(overrides={"num_workers": [2, 2]}).num_workers == 2
    assert scaling_config(get_cfg(overrides={"num_workers": 2})).num_workers == 2
    assert run_tags(get_cfg())["world_size"] == "1"


@pytest.mark.parametrize("bad", ["4-2", "0-2", "a-b", "-1", [1, 2, 3], 1.5])
def test_a_bad_range_is_one_line_naming_key_and_value(bad):
    given = parse_overrides([f"num_workers={bad}"]) if isinstance(bad, str) else {"num_workers": bad}  # as the CLI reads it
    with pytest.raises(UserError) as err:
        get_cfg(overrides=given)
    assert str(err.value).startswith(f"config key 'num_workers': value {given['num_workers']!r} is not valid")
    assert "\n" not in str(err.value)


def test_the_global_batch_stays_across_world_sizes():
    assert [split_batch(16, 32, w) for w in (1, 2, 4)] == [(16, 2), (8, 2), (4, 2)]
    assert split_batch(16, 64, 3) == (5, 4)  # 15 images a step on 3 workers: 4 batches make ~64


def test_a_run_grows_when_a_node_joins(tmp_path):
    out, result = run_cluster_script("elastic_run.py", tmp_path)
    assert result["nodes"] == 2
    assert "world size 1 -> 2 from epoch 2" in out.stdout  # the run's console

    # on_resize fired once on each rank of the grown group, with the batch split for two workers
    resizes = read_lines(tmp_path / "resizes.jsonl")
    assert sorted(r["rank"] for r in resizes) == [0, 1], resizes
    assert all(r["world_size"] == 2 and r["resized_from"] == 1 and r["start_epoch"] == 1 for r in resizes)
    assert all(r["batch_size"] == 8 and r["accumulate"] == 2 for r in resizes)

    client, run = finished_run(tmp_path, "1-2")

    # the event log: epoch 0 on one rank, epochs 1 and 2 (restarted mid-epoch 1) on two
    table = read_event_log(str(tmp_path / "store"), run.data.tags["orchestrator.run_id"]).to_pylist()
    assert sorted(r["rank"] for r in table if r["event"] == "on_resize") == [0, 1]
    assert epoch_ends(table) == {(0, 0): 1, (0, 1): 1, (1, 1): 1, (0, 2): 1, (1, 2): 1}
    assert_epochs_once_and_resized_at_1(client, run, before=1, after=2)


def test_a_run_shrinks_when_a_node_leaves(tmp_path):
    out, result = run_cluster_script("elastic_run.py", tmp_path, "shrink")
    assert result["nodes"] == 2  # the head (no room for workers) and the node left
    assert "world size 2 -> 1 from epoch 2" in out.stdout  # the run's console

    # started on two workers, 8 images each; rank 1's node left in epoch 1, and rank 0 alone went on
    # from epoch 0's checkpoint with 16, the global batch (16) and the gradient accumulation kept
    starts = read_lines(tmp_path / "starts.jsonl")
    assert sorted((s["rank"], s["world_size"], s["batch_size"], s["accumulate"], s["start_epoch"])
                  for s in starts) == [(0, 1, 16, 2, 1), (0, 2, 8, 2, 0), (1, 2, 8, 2, 0)], starts
    (resize,) = read_lines(tmp_path / "resizes.jsonl")  # on_resize: once, on the one rank left
    assert resize == {"rank": 0, "world_size": 1, "resized_from": 2, "batch_size": 16, "accumulate": 2,
                      "start_epoch": 1}

    client, run = finished_run(tmp_path, "1-2")

    # the event log: epoch 0 on two ranks, epochs 1 and 2 (restarted mid-epoch 1) on one
    table = read_event_log(str(tmp_path / "store"), run.data.tags["orchestrator.run_id"]).to_pylist()
    assert [r["rank"] for r in table if r["event"] == "on_resize"] == [0]
    assert epoch_ends(table) == {(0, 0): 1, (1, 0): 1, (0, 1): 1, (0, 2): 1}
    assert_epochs_once_and_resized_at_1(client, run, before=2, after=1)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def finished_run(folder, world_size: str):
    """The script's one MLflow run, checked FINISHED with the range as its ``world_size`` tag."""
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("runs").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == world_size
    return client, run


def epoch_ends(table: list[dict]) -> Counter:
    """(rank, epoch) of every epoch's end in the event log, counted raw."""
    return Counter((r["rank"], r["epoch"]) for r in table if r["event"] == "on_fit_epoch_end" and not r["final_eval"])


def assert_epochs_once_and_resized_at_1(client, run, before: int, after: int) -> None:
    """MLflow: every epoch metric once per epoch of three (raw points), the resize once, at epoch 1
    (system/: MLflow's own samples of the machine, at their own steps)."""
    points = {key: Counter(p.step for p in client.get_metric_history(run.info.run_id, key))
              for key in run.data.metrics if not key.startswith(("step/", "final/", "system/"))}
    assert points.pop("world_size") == {1: 1} and points.pop("world_size_before") == {1: 1}
    assert "metrics/accuracy_top1" in points and "train/loss" in points
    assert all(steps == {0: 1, 1: 1, 2: 1} for steps in points.values()), points
    assert [p.value for p in client.get_metric_history(run.info.run_id, "world_size")] == [after]
    assert [p.value for p in client.get_metric_history(run.info.run_id, "world_size_before")] == [before]
