"""A detection run on a Ray cluster of four raylets on this machine (``ray.cluster_utils.Cluster``)
while its S3 endpoint is cut for 30 s mid-run, run as a script by tests/test_multinode.py so that
its cluster does not meet the test session's Ray.

The head node hosts the driver and the callback actor; three training workers, one per other node
(a custom resource each node has once), so every rank, rank 0 included, is on another node than the
driver-side sinks, and rank 0's files travel through the store. Storage is moto behind a cuttable
TCP proxy: the cut starts when rank 0 begins epoch 1 and ends 30 s later; while it lasts every step
takes 0.25 s more, so the run trains through it. Tiny on purpose (a few images, 32 px): what is
checked is where records and files go, not what the model learns.

    python tests/multinode_run.py <folder>      # writes <folder>/result.json
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import MotoServer, TcpProxy, mlflow_store  # noqa: E402

BUCKET = "multinode"
RANKS = 3  # one per worker node
OUTAGE_S = 30.0


def note_node(folder: Path, trainer) -> None:
    """Each rank writes down its node in ``folder`` (one disk: the nodes are raylets of this machine)."""
    import ray

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{trainer.rank}").write_text(ray.get_runtime_context().get_node_id())


def mark_epoch(folder: Path, trainer) -> None:
    """Rank 0 notes when each epoch starts."""
    if trainer.rank == 0:
        (folder / f"epoch{trainer.epoch}").write_text(str(time.time()))


def slow_step(folder: Path, trainer) -> None:
    if (folder / "cut").exists() and not (folder / "restored").exists():
        time.sleep(0.25)


def cut_when_epoch_starts(folder: Path, proxy: TcpProxy, epoch: int = 1) -> None:
    while not (folder / f"epoch{epoch}").exists():
        time.sleep(0.05)
    proxy.cut()
    (folder / "cut").write_text(str(time.time()))
    time.sleep(OUTAGE_S)
    proxy.restore()
    (folder / "restored").write_text(str(time.time()))


def main(folder: Path) -> None:
    moto = MotoServer(folder / "moto").start()
    proxy = TcpProxy(moto.port).start()
    try:
        moto.create_bucket(BUCKET)
        # before the raylets start: their workers inherit it
        os.environ.update({**moto.client_env(), "AWS_ENDPOINT_URL": proxy.url})
        os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
        train(folder, proxy)
    finally:
        proxy.cut()
        moto.stop()


def train(folder: Path, proxy: TcpProxy) -> None:
    import ray

    from callbacks.sinks import read_event_log
    from callbacks.sinks.replay import table_records
    from callbacks.sinks.storage import ObjectStore
    from orchestrator import Model
    from trainers.data.shapes import generate_shapes

    marks, store = folder / "marks", f"s3://{BUCKET}/store"
    marks.mkdir(parents=True, exist_ok=True)
    with cluster_of(RANKS) as worker_nodes:
        data = generate_shapes(folder / "shapes", n_train=48, n_val=6, imgsz=32)
        model = Model("det-n.yaml")
        model.add_callback("on_train_start", partial(note_node, folder / "nodes"))
        model.add_callback("on_train_epoch_start", partial(mark_epoch, marks))
        model.add_callback("on_train_batch_end", partial(slow_step, marks))
        threading.Thread(target=cut_when_epoch_starts, args=(marks, proxy), daemon=True).start()
        model.train(
            data=str(data), imgsz=32, epochs=4, batch=6, nbs=6, workers=0, verbose=False, plots=True,
            num_workers=RANKS, resources_per_worker={"CPU": 1, "worker_node": 1}, storage=store,
            tracking_uri=mlflow_store(folder / "mlflow.db"), project=str(folder / "runs"), name="multinode",
            system_metrics=0.3)
        keys = ObjectStore.from_uri(store).list("")
        run_id = next(k.split("/")[1] for k in keys if k.startswith("runs/"))
        records = [{"event": r["event"], "rank": r["rank"], "artifacts": r["artifacts"]}
                   for r in table_records(read_event_log(store, run_id)) if r["artifacts"]]
        rank_nodes = {p.name: p.read_text() for p in (folder / "nodes").glob("rank*")}
        (folder / "result.json").write_text(json.dumps({
            "driver_node": ray.get_runtime_context().get_node_id(), "rank_nodes": rank_nodes,
            "worker_nodes": [node.node_id for node in worker_nodes], "run_id": run_id, "keys": keys,
            "records": records, "streams": raw_streams(store, run_id), "loaded": str(model.ckpt_path),
            "marks": {p.name: float(p.read_text()) for p in marks.iterdir()}}, default=str))


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
    """Every event-log row stored in ``store`` as ``[seq, event]``, by ``rank/attempt``, in seq
    order (raw: no de-duplication, so a record stored twice shows)."""
    from callbacks.sinks import read_event_log

    table = read_event_log(store, run_id, dedup_rows=False)
    streams: dict[str, list] = {}
    for rank, attempt, seq, event in zip(*(table.column(c).to_pylist() for c in ("rank", "attempt", "seq", "event"))):
        streams.setdefault(f"{rank}/{attempt}", []).append([seq, event])
    return streams


if __name__ == "__main__":
    main(Path(sys.argv[1]))
