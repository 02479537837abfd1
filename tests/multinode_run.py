"""A detection run on a Ray cluster of four raylets on this machine (``ray.cluster_utils.Cluster``),
run as a script by tests/test_multinode.py so that its cluster does not meet the test session's Ray.
The head node hosts the driver and the callback actor; three training workers, one per other node
(a custom resource each node has once), so every rank, rank 0 included, is on another node than the
driver-side sinks. Storage is a moto S3 endpoint over HTTP. Tiny on purpose (a few images, 32 px):
what is checked is where records and files go, not what the model learns.

    python tests/multinode_run.py <folder>      # writes <folder>/result.json
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import MotoServer  # noqa: E402

BUCKET = "multinode"
RANKS = 3  # one per worker node


def note_node(folder: Path, trainer) -> None:
    """Each rank writes down its node in ``folder`` (one disk: the nodes are raylets of this machine)."""
    import ray

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{trainer.rank}").write_text(ray.get_runtime_context().get_node_id())


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

    from callbacks.sinks import read_event_log
    from callbacks.sinks.replay import table_records
    from callbacks.sinks.storage import ObjectStore
    from orchestrator import Model
    from trainers.data.shapes import generate_shapes

    with cluster_of(RANKS) as worker_nodes:
        data = generate_shapes(folder / "shapes", n_train=12, n_val=6, imgsz=32)
        model = Model("det-n.yaml")
        model.add_callback("on_train_start", partial(note_node, folder / "nodes"))
        model.train(
            data=str(data), imgsz=32, epochs=2, batch=6, nbs=6, workers=0, verbose=False, plots=True,
            num_workers=RANKS, resources_per_worker={"CPU": 1, "worker_node": 1}, storage=f"s3://{BUCKET}/store",
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", project=str(folder / "runs"), name="multinode",
            system_metrics=0.3)
        keys = ObjectStore.from_uri(f"s3://{BUCKET}/store").list("")
        run_id = next(k.split("/")[1] for k in keys if k.startswith("runs/"))
        records = [{"event": r["event"], "rank": r["rank"], "artifacts": r["artifacts"]}
                   for r in table_records(read_event_log(f"s3://{BUCKET}/store", run_id)) if r["artifacts"]]
        rank_nodes = {p.name: p.read_text() for p in (folder / "nodes").glob("rank*")}
        (folder / "result.json").write_text(json.dumps({
            "driver_node": ray.get_runtime_context().get_node_id(), "rank_nodes": rank_nodes,
            "worker_nodes": [node.node_id for node in worker_nodes], "run_id": run_id, "keys": keys,
            "records": records, "streams": raw_streams(f"s3://{BUCKET}/store", run_id),
            "loaded": str(model.ckpt_path)}, default=str))


@contextmanager
def cluster_of(workers: int):
    """A head node of 1 CPU (the driver and its actors) and ``workers`` nodes of 1 CPU and one
    ``worker_node`` each (a rank per node); Ray joined; yields the worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1, resources={"worker_node": 1}) for _ in range(workers)]
        ray.init(address=cluster.address, configure_logging=False)
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def raw_streams(store: str, run_id: str) -> dict[str, list]:
    """Every event-log row stored in ``store`` as ``[seq, event]``, by ``rank/attempt``, in stored
    order (raw: no de-duplication, so a record stored twice shows)."""
    from callbacks.sinks import read_event_log

    table = read_event_log(store, run_id, dedup_rows=False)
    streams: dict[str, list] = {}
    for rank, attempt, seq, event in zip(*(table.column(c).to_pylist() for c in ("rank", "attempt", "seq", "event"))):
        streams.setdefault(f"{rank}/{attempt}", []).append([seq, event])
    return streams


if __name__ == "__main__":
    main(Path(sys.argv[1]))
