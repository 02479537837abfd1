"""Preemption: a checkpoint at the next optimizer step with the data position; the run resumes mid-epoch.

In process: a trainer told of a preemption saves a mid-epoch last.pt and stops; resumed from it, it
ends with the weights, optimizer state and epoch metrics of a run that was never cut, having trained
only the batches the cut left. On Ray (tests/preemption_run.py, a script like multinode_run.py): a
2-worker run, one worker a node, whose node of rank 1 is drained with reason preemption mid-epoch;
a spare node takes its place.
"""
from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import QUICK, run_cluster_script
from trainers.classify import ClassificationTrainer
from trainers.config import get_cfg
from trainers.data.loader import batches_from, build_dataloader
from trainers.engine.preemption import Preempted
from trainers.utils import UserError

CUT_AT_STEP = 7  # the first optimizer step of the second epoch (see quick)


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def differing(a: dict, b: dict) -> list[str]:
    """The keys whose tensors differ (bitwise) between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def results(trainer) -> list[dict]:
    with open(trainer.save_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def draw_random_numbers(trainer) -> None:
    """A user callback that uses the global RNGs (at every start, the restart's too): a resumed
    epoch still sees the draws the cut one would have seen next."""
    np.random.rand(3), torch.rand(3), random.random()


def quick(tmp_path, name: str) -> dict:
    # 172 images: 11 batches an epoch, a step every 2 and at the last: steps 1-6 in epoch 1, 7-12 in epoch 2
    return {**QUICK, "fraction": 0.12, "nbs": 32, "project": str(tmp_path), "name": name}


def test_a_mid_epoch_checkpoint_resumes_to_the_weights_and_metrics_of_an_uncut_run(tmp_path):
    whole = ClassificationTrainer(overrides=quick(tmp_path, "whole"))
    whole.add_callback("on_train_start", draw_random_numbers)
    whole.train()
    nb = len(whole.train_loader)
    assert whole.accumulate == 2 and nb == 11

    cut = ClassificationTrainer(overrides=quick(tmp_path, "cut"))
    cut.preemption_notice = lambda: cut.step >= CUT_AT_STEP
    cut.add_callback("on_train_start", draw_random_numbers)
    with pytest.raises(Preempted):
        cut.train()
    saved = load(cut.last)
    assert (saved["epoch"], saved["step"]) == (1, CUT_AT_STEP)
    assert saved["position"]["batch"] == 2 and saved["position"]["batches"] == nb
    assert len(results(cut)) == 1  # the cut epoch has no row (nor epoch record) of its own

    trained = []
    resumed = ClassificationTrainer(overrides={"resume": str(cut.last), "project": str(tmp_path)})
    resumed.add_callback("on_train_batch_end", lambda t: trained.append((t.epoch, t.step)))
    resumed.add_callback("on_train_start", draw_random_numbers)
    resumed.train()
    assert resumed.save_dir == cut.save_dir
    assert [e for e, _ in trained] == [1] * (nb - 2)  # only the batches the cut left
    assert trained[-1][1] == whole.step == 12

    final, expected = load(resumed.last), load(whole.last)
    assert differing(final["model"], expected["model"]) == []
    assert differing(final["ema"], expected["ema"]) == []
    for mine, theirs in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert differing(mine, theirs) == []
    cut_rows, whole_rows = results(resumed), results(whole)
    assert len(cut_rows) == 2
    assert [{k: v for k, v in row.items() if k != "time"} for row in cut_rows] == \
           [{k: v for k, v in row.items() if k != "time"} for row in whole_rows]


class Counted(torch.utils.data.Dataset):
    """A data set that remembers which items were read."""

    def __init__(self, n: int):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        return i


def test_a_resumed_epoch_reads_only_the_samples_it_did_not_train():
    data = Counted(52)
    loader = build_dataloader(data, 4, 0, "train", 1, 2, seed=7)  # rank 1 of 2: 26 indices, 7 batches
    loader.sampler.set_epoch(3)
    everything = torch.cat(list(loader))
    loader.sampler.set_epoch(0)
    data.read.clear()
    rest = torch.cat(list(batches_from(loader, 5, {"seed": 7, "epoch": 3})))
    assert torch.equal(rest, everything[5 * 4:])
    assert sorted(data.read) == sorted(everything[5 * 4:].tolist())
    assert len(torch.cat(list(loader))) == len(everything) == 26  # the skip held for one pass


def test_max_preemptions_is_a_count_or_minus_one():
    assert get_cfg().max_preemptions == 3
    assert get_cfg(None, {"max_preemptions": -1}).max_preemptions == -1
    with pytest.raises(UserError, match="'max_preemptions'"):
        get_cfg(None, {"max_preemptions": -2})


# ---------------------------------------------------------------- on Ray: a drained node
def test_a_preempted_node_costs_no_batch_and_no_epoch_metric_is_logged_twice(tmp_path):
    out, result = run_cluster_script("preemption_run.py", tmp_path)
    drained = result["drained"]["node"][:8]
    assert result["cloud"][-1].endswith(f"node {drained} removed"), result["cloud"]

    # Two attempts; the first stopped mid-epoch; no batch was trained twice or skipped.
    (first, *later), whole = [result["steps"][k] for k in sorted(result["steps"], key=int)], result["whole_steps"]
    nb = len(next(iter(whole.values()))) // 2
    assert len(later) == 1 and 0 < len(first) < nb, (len(first), nb)
    lost = len(first) + len(later[0]) - 2 * nb
    print(f"\npreemption: node drained at step {result['drained']['step']}, checkpoint at step {first[-1]} "
          f"(batch {len(first)} of {nb}); batches trained twice (lost work): {lost}; "
          f"run {result['cut']['seconds']} s vs {result['whole']['seconds']} s undisturbed")
    assert lost == 0 and first + later[0] == next(iter(whole.values()))

    # The same weights as the run without the preemption.
    cut, uncut = load(result["cut"]["last"]), load(result["whole"]["last"])
    assert differing(cut["model"], uncut["model"]) == [] and differing(cut["ema"], uncut["ema"]) == []

    # Every metric point once: epoch metrics at epochs 0 and 1, step metrics once a step; the same values.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    points = {name: metric_points(client, result[name]["mlflow_run"]) for name in ("cut", "whole")}
    assert client.get_run(result["cut"]["mlflow_run"]).info.status == "FINISHED"
    epoch_keys = [k for k in points["cut"] if not k.startswith(("step/", "final/"))]
    assert {"train/loss", "val/loss", "fitness", "lr/pg0"} <= set(epoch_keys)
    assert all([step for step, _ in points["cut"][k]] == [0, 1] for k in epoch_keys), points["cut"]
    for key, values in points["cut"].items():
        assert len({step for step, _ in values}) == len(values), key
    assert points["cut"] == points["whole"]


def metric_points(client, run_id: str) -> dict:
    """Every raw point of every training metric of a run: ``{key: [(step, value), ...]}`` by step
    (not the machines' ``system/`` samples)."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}
