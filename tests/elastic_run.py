"""An elastic training run on a Ray cluster that changes mid-run (``ray.cluster_utils.Cluster``:
raylets on this machine), run as a script by tests/test_elastic.py so that its cluster does not
meet the test session's Ray. ``SCENARIOS`` names the cluster, the range and the change:

- ``grow``: ``num_workers=1-2``, the head has room for one worker, so the run starts with one; a
  second node joins in epoch 1 and Ray Train restarts the group with two (a resize).
- ``shrink``: ``num_workers=1-2`` on two one-worker nodes (the head has none), so it starts with
  two; in epoch 1 rank 1's node leaves, which kills rank 1: a worker failure (``max_failures=1``),
  and Ray Train restarts the group with the one worker the cluster still has room for.

In epoch 1 every rank of the starting group holds its first batch and the highest rank asks for
the change (a marker file this script watches) once epoch 0's checkpoint is registered: the
restart continues from it, at the new size, to the end. The hold puts the change mid-epoch, as
Ray's checks every ``resize_interval`` s and a node's loss mostly do. The ranks' records of epoch 0
reached the driver before its report (``ray_launch.deliver_before_report``), so removing a node
right after the checkpoint's registration loses none of them.

    python tests/elastic_run.py <folder> [scenario]     # writes <folder>/result.json
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOLD_S = 180.0  # longest the starting group waits in epoch 1 for the restart that ends it


@dataclass(frozen=True)
class Scenario:
    head_cpus: int  # workers the head has room for (it holds the driver and the callback actor)
    nodes: int  # one-worker nodes besides the head at the start
    num_workers: str
    change: str  # in epoch 1: "add" a one-worker node, or "remove" the node of the highest rank
    max_failures: int = 0  # a node that leaves kills its workers: a failure
    start_timeout: float = 60.0  # s Ray Train waits for a worker group (after a node left: for the old size)


SCENARIOS = {
    "grow": Scenario(head_cpus=1, nodes=0, num_workers="1-2", change="add"),
    "shrink": Scenario(head_cpus=0, nodes=2, num_workers="1-2", change="remove", max_failures=1, start_timeout=20.0),
}


def main(folder: Path, scenario: Scenario) -> None:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
                      RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=str(scenario.start_timeout))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": scenario.head_cpus,
                                                            "include_dashboard": False})
    try:
        for _ in range(scenario.nodes):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, configure_logging=False)
        failure: list[BaseException] = []
        runner = threading.Thread(target=train, args=(folder, scenario, failure), name="train", daemon=True)
        runner.start()
        change_when_asked(cluster, scenario, folder / "change", runner)
        runner.join()
        if failure:
            raise failure[0]
        (folder / "result.json").write_text(json.dumps({"nodes": len(cluster.list_all_nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def change_when_asked(cluster, scenario: Scenario, marker: Path, runner: threading.Thread) -> None:
    """Change the cluster once the highest rank asks, naming its node (on the main thread: a
    raylet's start installs signal handlers)."""
    while runner.is_alive() and not marker.exists():
        time.sleep(0.2)
    if not marker.exists():
        return
    if scenario.change == "add":
        cluster.add_node(num_cpus=1)
    else:
        asker = marker.read_text()
        cluster.remove_node(next(node for node in cluster.worker_nodes if node.node_id == asker))


def train(folder: Path, scenario: Scenario, failure: list) -> None:
    try:
        train_elastic(folder, scenario)
    except BaseException as exc:  # handed to the main thread
        failure.append(exc)


def train_elastic(folder: Path, scenario: Scenario) -> None:
    from orchestrator import Model

    storage, resizes, marker = folder / "store", folder / "resizes.jsonl", folder / "change"

    def hold_until_resized(trainer):
        """Every rank of the starting group in epoch 1: once epoch 0's checkpoint is registered,
        the highest rank asks for the change, naming its node; all wait for the restart at the
        new size, which ends these processes."""
        if trainer.resized_from is not None or trainer.epoch != 1:
            return
        import ray

        from tests.helpers import wait_for_registered_checkpoint

        wait_for_registered_checkpoint(str(storage), trainer.args.name, epoch=0)
        if trainer.rank == trainer.world_size - 1:
            asking = marker.with_suffix(".tmp")
            asking.write_text(ray.get_runtime_context().get_node_id())
            asking.replace(marker)  # whole, never read half-written
        time.sleep(HOLD_S)
        raise RuntimeError(f"no restart at a new size within {HOLD_S:.0f}s of asking for the cluster's change")

    model = Model("cls-n.yaml")
    model.add_callback("on_train_batch_start", hold_until_resized)
    model.add_callback("on_train_start", note_to(folder / "starts.jsonl"))
    model.add_callback("on_resize", note_to(resizes))
    model.train(data="digits", imgsz=16, fraction=0.1, epochs=3, batch=16, nbs=32, verbose=True, plots=False,
                workers=0, seed=0, num_workers=scenario.num_workers, max_failures=scenario.max_failures,
                resources_per_worker={"CPU": 1}, resize_interval=1.0,
                storage=str(storage), tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                project=str(folder / "runs"), name="elastic")


def note_to(path: Path):
    """A callback that appends the rank's size and batch split, one JSON line per call."""
    def note(trainer):
        line = {k: getattr(trainer, k) for k in ("rank", "world_size", "resized_from", "batch_size",
                                                  "accumulate", "start_epoch")}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    return note


if __name__ == "__main__":
    main(Path(sys.argv[1]), SCENARIOS[sys.argv[2] if len(sys.argv) > 2 else "grow"])
