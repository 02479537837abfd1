"""Elastic runs (``num_workers`` a range): the config forms, and runs that Ray resizes mid-run.

tests/elastic_run.py runs ``num_workers=1-2`` on a cluster with room for one worker, adds a node
in epoch 1 and removes it in epoch 2: the run grows to two workers from epoch 0's checkpoint,
shrinks back to one from epoch 1's, and finishes; ``on_resize`` fired on every rank of each new group, and MLflow has each epoch's metrics
once.
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


def test_a_run_grows_when_a_node_joins_and_shrinks_when_it_leaves(tmp_path):
    out, result = run_cluster_script("elastic_run.py", tmp_path)
    assert result["nodes"] == 1  # the head: the node that joined has left
    for change in ("1 -> 2 from epoch 2", "2 -> 1 from epoch 3"):
        assert f"world size {change}" in out.stdout, change

    # started on one worker with the global batch (16); grew to two, 8 images each, from epoch 0's
    # checkpoint; shrank to one from epoch 1's: the accumulation up to the nominal batch (32) kept
    starts = read_lines(tmp_path / "starts.jsonl")
    assert sorted((s["rank"], s["world_size"], s["batch_size"], s["accumulate"], s["start_epoch"])
                  for s in starts) == [(0, 1, 16, 2, 0), (0, 1, 16, 2, 2), (0, 2, 8, 2, 1), (1, 2, 8, 2, 1)], starts
    # on_resize: on each rank of each new group
    resizes = sorted((r["start_epoch"], r["rank"], r["resized_from"], r["world_size"], r["batch_size"])
                     for r in read_lines(tmp_path / "resizes.jsonl"))
    assert resizes == [(1, 0, 1, 2, 8), (1, 1, 1, 2, 8), (2, 0, 2, 1, 16)], resizes

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("runs").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "1-2"

    # the event log: epoch 0 on one rank, 1 on two, 2 (restarted mid-epoch) and 3 on one
    table = read_event_log(str(tmp_path / "store"), run.data.tags["orchestrator.run_id"]).to_pylist()
    assert sorted((r["epoch"], r["rank"]) for r in table if r["event"] == "on_resize") == [(1, 0), (1, 1), (2, 0)]
    assert epoch_ends(table) == {(0, 0): 1, (0, 1): 1, (1, 1): 1, (0, 2): 1, (0, 3): 1}

    # MLflow: every epoch metric once per epoch (raw points), each resize once, at its epoch
    # (system/: MLflow's own samples of the machine, at their own steps)
    points = {key: Counter(p.step for p in client.get_metric_history(run.info.run_id, key))
              for key in run.data.metrics if not key.startswith(("step/", "final/", "system/"))}
    history = {key: [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, key)]
               for key in ("world_size", "world_size_before")}
    # raw points: one at each resize's epoch, none twice
    assert sorted(history["world_size"]) == [(1, 2), (2, 1)]
    assert sorted(history["world_size_before"]) == [(1, 1), (2, 2)]
    del points["world_size"], points["world_size_before"]
    assert "metrics/accuracy_top1" in points and "train/loss" in points
    assert all(steps == {epoch: 1 for epoch in range(4)} for steps in points.values()), points


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def epoch_ends(table: list[dict]) -> Counter:
    """(rank, epoch) of every epoch's end in the event log, counted raw."""
    return Counter((r["rank"], r["epoch"]) for r in table if r["event"] == "on_fit_epoch_end" and not r["final_eval"])
