"""An elastic training run on a Ray cluster that changes mid-run (``ray.cluster_utils.Cluster``:
raylets on this machine), run as a script by tests/test_elastic.py so that its cluster does not
meet the test session's Ray.

``num_workers=1-2`` on a head with room for one worker: the run starts with one. In epoch 1 a
one-worker node joins and Ray Train restarts the group with two (a resize); in epoch 2 that node
leaves, which kills the rank on it: a worker failure (``max_failures=1``), and Ray Train restarts
the group with the one worker the cluster still has room for.

In each of those epochs every rank of the group holds its first batch and the highest rank asks
for the change (a marker file this script watches) once the previous epoch's checkpoint is
registered: the restart continues from it, at the new size, to the end. The hold puts each change
mid-epoch, as Ray's checks every ``resize_interval`` s and a node's loss mostly do. The ranks'
records of the previous epoch reached the driver before its report
(``ray_launch.deliver_before_report``), so removing a node right after the checkpoint's
registration loses none of them.

Ray Train sizes a group from Ray's autoscaling coordinator, which looks at the cluster's nodes
every 20 s: after each change this script asks it to look at once (``look_at_nodes``), so the test
does not wait out those ticks (a user's run does; it changes size up to 20 s later).

    python tests/elastic_run.py <folder>     # writes <folder>/result.json
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from tests.servers import mlflow_store  # noqa: E402

HOLD_S = 180.0  # longest a group waits in a changing epoch for the restart that ends it
CHANGES = {1: "add", 2: "remove"}  # epoch -> the cluster's change in it
EPOCHS = 4
START_TIMEOUT_S = 8.0  # Ray Train waits this long for a group of the old size after a node left (only for
# its placement group: resources that are there take well under a second)


def main(folder: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
                      RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=str(START_TIMEOUT_S))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, configure_logging=False)
        failure: list[BaseException] = []
        runner = threading.Thread(target=train, args=(folder, failure), name="train", daemon=True)
        runner.start()
        change_when_asked(cluster, folder, runner)
        runner.join()
        if failure:
            raise failure[0]
        (folder / "result.json").write_text(json.dumps({"nodes": len(cluster.list_all_nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def change_when_asked(cluster, folder: Path, runner: threading.Thread) -> None:
    """Make each change once a rank asks for it (on the main thread: a raylet's start installs
    signal handlers): add a one-worker node, or remove the last one added."""
    joined = []
    for epoch, change in sorted(CHANGES.items()):
        marker = folder / f"change-{epoch}"
        while runner.is_alive() and not marker.exists():
            time.sleep(0.2)
        if not marker.exists():
            return
        if change == "add":
            joined.append(cluster.add_node(num_cpus=1))
        else:
            cluster.remove_node(joined.pop())
        look_at_nodes()


def look_at_nodes() -> None:
    """Have Ray's autoscaling coordinator (Ray Data's, which Ray Train's elastic policy asks how
    many workers fit) take in the cluster's nodes now rather than at its next 20-s tick."""
    import ray

    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("elastic-run-test", recompute=True))


def train(folder: Path, failure: list) -> None:
    try:
        train_elastic(folder)
    except BaseException as exc:  # handed to the main thread
        failure.append(exc)


def train_elastic(folder: Path) -> None:
    from orchestrator import Model

    storage, resizes = folder / "store", folder / "resizes.jsonl"

    def hold_until_resized(trainer):
        """Every rank of a group that reaches a changing epoch (not one started in it): once the
        previous epoch's checkpoint is registered, the highest rank asks for the change; all wait
        for the restart at the new size, which ends these processes."""
        if trainer.epoch not in CHANGES or trainer.start_epoch >= trainer.epoch:
            return
        from tests.helpers import wait_for_registered_checkpoint

        wait_for_registered_checkpoint(str(storage), trainer.args.name, epoch=trainer.epoch - 1)
        if trainer.rank == trainer.world_size - 1:
            (folder / f"change-{trainer.epoch}").touch()
        time.sleep(HOLD_S)
        raise RuntimeError(f"no restart at a new size within {HOLD_S:.0f}s of asking for the cluster's change")

    model = Model("cls-n.yaml")
    model.add_callback("on_train_batch_start", hold_until_resized)
    model.add_callback("on_train_start", note_to(folder / "starts.jsonl"))
    model.add_callback("on_resize", note_to(resizes))
    model.train(data="digits", imgsz=16, fraction=0.1, epochs=EPOCHS, batch=16, nbs=32, verbose=True, plots=False,
                workers=0, seed=0, num_workers="1-2", max_failures=1,
                resources_per_worker={"CPU": 1}, resize_interval=1.0,
                storage=str(storage), tracking_uri=mlflow_store(folder / "mlflow.db"),
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
    main(Path(sys.argv[1]))
