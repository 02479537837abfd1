"""Two training runs on a Ray cluster of raylets on this machine (``ray.cluster_utils.Cluster``), run
as a script by tests/test_preemption.py so that its cluster does not meet the test session's Ray:
the same 2-worker run (one worker a node) undisturbed, then again with the node of rank 1 drained
with reason preemption mid-epoch, as a cloud's spot notice does (``ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION``, the same GCS call). The cluster has a spare node for the restart (what
an autoscaler would add; ``Cluster.add_node`` works on the main thread only), and a thread plays the
cloud: it removes a drained node at its deadline.

    python tests/preemption_run.py <folder>      # writes <folder>/result.json
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

DEADLINE_S = 8  # the notice: seconds from the drain until the node goes
DRAIN_AT_STEP = 1  # rank 1's optimizer step at which its node is drained (of 45 in epoch 1 of 2)
STEP_AFTER_DRAIN_S = 0.25  # a step's time once drained: 44 steps left outlast the deadline
NODE = {"num_cpus": 1, "resources": {"slot": 1}}  # one training worker a node
RUN = dict(data="digits", imgsz=16, fraction=0.5, batch=16, epochs=2, verbose=False, plots=False, seed=0, num_workers=2,
           resources_per_worker={"CPU": 1, "slot": 1}, max_failures=0)  # a preemption is no failure


class DrainOwnNode:
    """A worker callback: rank 1, at optimizer step ``step``, has its own node drained with reason
    preemption and a deadline; once (drained.json marks it)."""

    def __init__(self, step: int, folder: str):
        self.step, self.folder = step, folder

    def __call__(self, trainer) -> None:
        if trainer.rank != 1 or trainer.step != self.step or self.done():
            return
        import ray
        from ray.core.generated import autoscaler_pb2

        node = ray.get_runtime_context().get_node_id()
        deadline_ms = time.time_ns() // 1_000_000 + DEADLINE_S * 1000
        (Path(self.folder) / "drained.json").write_text(json.dumps({"node": node, "step": trainer.step}))
        accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(
            node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot notice", deadline_ms)
        assert accepted, why

    def done(self) -> bool:
        return (Path(self.folder) / "drained.json").is_file()


class SlowAfterDrain:
    """A worker callback: every rank's steps take ``seconds`` more once the node is drained, as a
    real model's would: the notice (Ray polls for it) then comes within the epoch, whatever the
    load of this machine, and the epoch still ends long after the deadline."""

    def __init__(self, seconds: float, folder: str):
        self.seconds, self.folder = seconds, folder

    def __call__(self, trainer) -> None:
        if trainer.resume_ckpt is None and (Path(self.folder) / "drained.json").is_file():
            time.sleep(self.seconds)  # the restarted group (it resumed) runs at full speed


def play_the_cloud(cluster, stop: threading.Event, log: list) -> None:
    """A drained node is taken away at its deadline."""
    import ray

    while not stop.wait(0.2):
        draining = ray._private.state.state.get_draining_nodes()
        for node in [n for n in cluster.worker_nodes if n.node_id in draining]:
            log.append(f"{time.time():.1f} node {node.node_id[:8]} drained")
            time.sleep(max(draining[node.node_id] / 1000 - time.time(), 0) + 0.5)
            cluster.remove_node(node)
            log.append(f"{time.time():.1f} node {node.node_id[:8]} removed")


def train(folder: Path, name: str, callbacks=()) -> dict:
    """One run; its time, MLflow run, orchestrator run id and last.pt."""
    from mlflow.tracking import MlflowClient

    from orchestrator import Model

    model = Model("cls-n.yaml")
    for event, fn in callbacks:
        model.add_callback(event, fn)
    started = time.monotonic()
    tracking = mlflow_store(folder / "mlflow.db")
    model.train(**RUN, project=str(folder / "runs"), name=name, storage=str(folder / "store"),
                journal=str(folder / "journal"), tracking_uri=tracking)
    run = MlflowClient(tracking).get_run(model.mlflow_run_id)
    return {"seconds": round(time.monotonic() - started, 1), "mlflow_run": model.mlflow_run_id,
            "run_id": run.data.tags["orchestrator.run_id"], "last": str(folder / "runs" / name / "weights" / "last.pt")}


def steps_by_attempt(folder: Path, run_id: str) -> dict:
    """Rank 0's optimizer steps trained (its ``on_train_batch_end`` records), per Ray Train attempt,
    from the run's event log."""
    from callbacks.sinks import read_event_log
    from callbacks.sinks.replay import table_records

    out: dict = {}
    for r in table_records(read_event_log(str(folder / "store"), run_id)):
        if r["rank"] == 0 and r["event"] == "on_train_batch_end":
            out.setdefault(str(r["attempt"]), []).append(r["step"])
    return out


def main(folder: Path) -> None:
    os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
                      RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5")  # before the raylets start: Ray's processes inherit it
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(3):  # two for the workers, a spare for the restart
        cluster.add_node(**NODE)
    stop, log = threading.Event(), []
    try:
        ray.init(address=cluster.address, configure_logging=False)
        whole = train(folder, "whole")
        cloud = threading.Thread(target=play_the_cloud, args=(cluster, stop, log), daemon=True)
        cloud.start()
        cut = train(folder, "cut", [("on_train_batch_end", DrainOwnNode(DRAIN_AT_STEP, str(folder))),
                                    ("on_train_batch_end", SlowAfterDrain(STEP_AFTER_DRAIN_S, str(folder)))])
        (folder / "result.json").write_text(json.dumps({
            "whole": whole, "cut": cut, "drained": json.loads((folder / "drained.json").read_text()),
            "steps": steps_by_attempt(folder, cut["run_id"]), "whole_steps": steps_by_attempt(folder, whole["run_id"]),
            "cloud": log}))
    finally:
        stop.set()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
