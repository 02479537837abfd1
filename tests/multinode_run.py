"""A training run on a two-node Ray cluster (``ray.cluster_utils.Cluster``: two raylets on this
machine), run as a script by tests/test_multinode.py so that its cluster does not meet the test
session's Ray. The head node hosts the driver and the callback actor; the training worker is
pinned to the second node by a custom resource, so its rank 0 is on another node than the
driver-side sinks. Storage is a moto S3 endpoint over HTTP.

    python tests/multinode_run.py <folder>      # writes <folder>/result.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import MotoServer  # noqa: E402

BUCKET = "multinode"


def main(folder: Path) -> None:
    moto = MotoServer(folder / "moto").start()
    try:
        moto.create_bucket(BUCKET)
        os.environ.update(moto.client_env())  # before the raylets start: their workers inherit it
        os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
        train(folder)
    finally:
        moto.stop()


def train(folder: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from callbacks.sinks import read_event_log
    from callbacks.sinks.replay import table_records
    from callbacks.sinks.storage import ObjectStore
    from orchestrator import Model

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    try:
        ray.init(address=cluster.address, configure_logging=False)
        model = Model("cls-n.yaml")
        model.train(
            data="digits", imgsz=16, fraction=0.1, epochs=2, batch=16, nbs=16, verbose=False, plots=True,
            num_workers=1, resources_per_worker={"CPU": 1, "worker_node": 0.5}, storage=f"s3://{BUCKET}/store",
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", project=str(folder / "runs"), name="multinode")
        keys = ObjectStore.from_uri(f"s3://{BUCKET}/store").list("")
        run_id = next(k.split("/")[1] for k in keys if k.startswith("runs/"))
        records = [{"event": r["event"], "rank": r["rank"], "artifacts": r["artifacts"]}
                   for r in table_records(read_event_log(f"s3://{BUCKET}/store", run_id)) if r["artifacts"]]
        (folder / "result.json").write_text(json.dumps({
            "driver_node": ray.get_runtime_context().get_node_id(), "worker_node": worker_node.node_id,
            "run_id": run_id, "keys": keys, "records": records, "loaded": str(model.ckpt_path)}, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
