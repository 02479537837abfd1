"""A detection run on two other nodes than the driver's (``ray.cluster_utils.Cluster``) while its S3
endpoint is cut for 30 s mid-run: run as a script by tests/test_multinode.py so that its cluster
does not meet the test session's Ray.

The endpoint is moto behind a cuttable TCP proxy; rank 0 is on another node than the driver-side
sinks, so its files travel through the store. The cut starts when rank 0 begins epoch 1 and ends
30 s later; while it lasts every step takes 0.25 s more, so the run trains through it.

    python tests/s3_outage_run.py <folder>      # writes <folder>/result.json
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import MotoServer, TcpProxy  # noqa: E402

BUCKET = "outage"
RANKS = 2
OUTAGE_S = 30.0


def mark_epoch(folder: Path, trainer) -> None:
    """Rank 0 notes when each epoch starts (and every rank its node, once)."""
    import ray

    if trainer.rank == 0:
        (folder / f"epoch{trainer.epoch}").write_text(str(time.time()))
    (folder / f"node{trainer.rank}").write_text(ray.get_runtime_context().get_node_id())


def nodes_of(folder: Path) -> dict[str, str]:
    return {p.name[len("node"):]: p.read_text() for p in folder.glob("node*")}


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
        os.environ.update({**moto.client_env(), "AWS_ENDPOINT_URL": proxy.url})
        os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
        train(folder, proxy)
    finally:
        proxy.cut()
        moto.stop()


def train(folder: Path, proxy: TcpProxy) -> None:
    import ray

    from callbacks.sinks.storage import ObjectStore
    from orchestrator import Model
    from tests.multinode_run import cluster_of, raw_streams
    from trainers.data.shapes import generate_shapes

    marks = folder / "marks"
    marks.mkdir(parents=True, exist_ok=True)
    with cluster_of(RANKS):
        data = generate_shapes(folder / "shapes", n_train=48, n_val=6, imgsz=32)
        model = Model("det-n.yaml")
        model.add_callback("on_train_epoch_start", partial(mark_epoch, marks))
        model.add_callback("on_train_batch_end", partial(slow_step, marks))
        threading.Thread(target=cut_when_epoch_starts, args=(marks, proxy), daemon=True).start()
        started = time.time()
        model.train(
            data=str(data), imgsz=32, epochs=4, batch=6, nbs=6, workers=0, verbose=False, plots=False,
            num_workers=RANKS, resources_per_worker={"CPU": 1, "worker_node": 1}, storage=f"s3://{BUCKET}/store",
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", project=str(folder / "runs"), name="outage",
            system_metrics=0)
        store = f"s3://{BUCKET}/store"
        keys = ObjectStore.from_uri(store).list("")
        run_id = next(k.split("/")[1] for k in keys if k.startswith("runs/"))
        (folder / "result.json").write_text(json.dumps({
            "seconds": time.time() - started, "marks": {p.name: float(p.read_text()) for p in marks.glob("[!n]*")},
            "run_id": run_id, "keys": keys, "streams": raw_streams(store, run_id),
            "rank_nodes": nodes_of(marks),
            "driver_node": ray.get_runtime_context().get_node_id()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
