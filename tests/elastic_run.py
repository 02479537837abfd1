"""An elastic training run (``num_workers=1-2``) on a Ray cluster that grows mid-run
(``ray.cluster_utils.Cluster``: raylets on this machine), run as a script by tests/test_elastic.py so
that its cluster does not meet the test session's Ray.

The head node has room for one worker, so the run starts with one. In epoch 1 that worker holds
its first batch and asks for a second node (a marker file this script watches); Ray Train then
restarts the worker group from epoch 0's checkpoint with two workers, which train on to the end.
The hold puts the resize mid-epoch, as Ray's checks every ``resize_interval`` s mostly do.

    python tests/elastic_run.py <folder>      # writes <folder>/result.json
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

HOLD_S = 120.0  # longest a lone worker waits in epoch 1 for the resize that ends it


def main(folder: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, configure_logging=False)
        failure: list[BaseException] = []
        runner = threading.Thread(target=train, args=(folder, failure), name="train", daemon=True)
        runner.start()
        grow_when_asked(cluster, folder / "grow", runner)
        runner.join()
        if failure:
            raise failure[0]
        (folder / "result.json").write_text(json.dumps({"nodes": len(cluster.list_all_nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def grow_when_asked(cluster, marker: Path, runner: threading.Thread) -> None:
    """Add a node with room for one more worker once the lone worker asks for it (on the main
    thread: a raylet's start installs signal handlers)."""
    while runner.is_alive() and not marker.exists():
        time.sleep(0.2)
    if marker.exists():
        cluster.add_node(num_cpus=1)


def train(folder: Path, failure: list) -> None:
    try:
        train_elastic(folder)
    except BaseException as exc:  # handed to the main thread
        failure.append(exc)


def train_elastic(folder: Path) -> None:
    from orchestrator import Model

    storage, resizes, marker = folder / "store", folder / "resizes.jsonl", folder / "grow"

    def hold_until_resized(trainer):
        """Rank 0 alone in epoch 1: once epoch 0's checkpoint is registered, ask for a node and
        wait; the restart at two workers ends this process."""
        if trainer.world_size > 1 or trainer.epoch != 1:
            return
        from tests.helpers import wait_for_registered_checkpoint

        wait_for_registered_checkpoint(str(storage), trainer.args.name, epoch=0)
        marker.write_text("grow")
        time.sleep(HOLD_S)
        raise RuntimeError(f"no resize within {HOLD_S:.0f}s of the second node's start")

    def note_resize(trainer):
        line = {k: getattr(trainer, k) for k in ("rank", "world_size", "resized_from", "batch_size",
                                                  "accumulate", "start_epoch")}
        with open(resizes, "a") as f:
            f.write(json.dumps(line) + "\n")

    model = Model("cls-n.yaml")
    model.add_callback("on_train_batch_start", hold_until_resized)
    model.add_callback("on_resize", note_resize)
    model.train(data="digits", imgsz=16, fraction=0.1, epochs=3, batch=16, nbs=32, verbose=True, plots=False,
                workers=0, seed=0, num_workers="1-2", resources_per_worker={"CPU": 1}, resize_interval=1.0,
                storage=str(storage), tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                project=str(folder / "runs"), name="elastic")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
