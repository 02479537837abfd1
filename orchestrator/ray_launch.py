"""Run a trainer on Ray Train workers (Train V2 ``TorchTrainer``), events to one driver actor.

Per-step data travels through the event forwarder; once per epoch every rank calls
``ray.train.report`` (a barrier) with the epoch metrics, rank 0 attaching ``last.pt``.
"""
from __future__ import annotations

import gc
import os
import shutil
import socket
import time
import tempfile
import threading
from pathlib import Path

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from callbacks.actor import start_callback_actor
from callbacks.artifacts import ArtifactShipper
from callbacks.forwarder import EventForwarder
from trainers.engine.resume import training_finished
from trainers.utils import LOGGER, UserError


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        probe_address(address)
    try:
        ray.init(address=address or None, log_to_driver=True, configure_logging=False)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc}".splitlines()[0]) from None


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the address, instead of letting ray.init retry for minutes."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port; leave it to ray.init
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc.strerror or exc}") from None


def storage_for(storage: str) -> tuple[str, object | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for a local path or ``s3://bucket/prefix``."""
    if not storage.startswith("s3://"):
        path = Path(storage).resolve() / "ray"
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"endpoint_override": endpoint} if endpoint else {}
    if endpoint and endpoint.startswith("http://"):
        kwargs["scheme"] = "http"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return storage[len("s3://"):].rstrip("/") + "/ray", fs.S3FileSystem(**kwargs)


class RayBackend:
    """A ``RunSession`` backend: the driver callbacks in one callback actor, the trainer on Ray
    Train workers (``TorchTrainer.fit`` waits for them).

    ``defer_run``: the actor's MLflow sink creates the MLflow run while Ray starts the workers
    (MLflow's import and database set-up would otherwise delay the driver by seconds).
    """

    defer_run = True
    stops_at_once = True  # the driver only waits on the workers; the job's end stops them

    def __init__(self):
        self.actor = self.trainer = None
        self._beating = threading.Event()

    def connect(self) -> None:
        connect_ray()

    def start(self, session) -> None:
        self.actor = start_callback_actor(session.callbacks, name=f"callbacks-{session.run_id}",
                                          journal=session.journal, orphan_after=ORPHAN_AFTER)
        threading.Thread(target=heartbeat, args=(self.actor, self._beating), name="heartbeat", daemon=True).start()
        self.trainer = make_torch_trainer(session.factory, session.args, self.actor, session.run_id,
                                          session.events, name=f"{session.args.name}-{session.run_id}")

    def train(self, session) -> None:
        """``fit()`` on a thread of its own, so that Ray Train installs no SIGINT handler of its own
        (it does on the main thread): Ctrl+C and SIGTERM stay ours (``orchestrator/stops.py``)."""
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                self.trainer.fit()
            except BaseException as exc:  # handed to the waiting thread
                failure.append(exc)

        thread = threading.Thread(target=fit, name="train-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)  # a signal's handler runs between these waits
        if failure:
            raise failure[0]

    def finish(self, session, status: str, reason: str | None = None) -> dict:
        """Close the actor's sinks with the run's status, then stop the actor (it serves one run)."""
        self._beating.set()
        report = ray.get(self.actor.finish.remote(status, reason))
        ray.kill(self.actor)
        log_report(report)
        return report

    def outcome(self) -> dict:
        """Nothing beyond the session's result: the trainers lived in the workers."""
        return {}


HEARTBEAT = 5.0  # seconds between the driver's heartbeats to its callback actor
ORPHAN_AFTER = 30.0  # seconds of silence after which the actor ends the run itself (the driver died)


def heartbeat(actor, stop: threading.Event) -> None:
    """Tell the callback actor every ``HEARTBEAT`` s that this driver lives (fire and forget)."""
    while not stop.wait(HEARTBEAT):
        actor.heartbeat.remote()


def make_torch_trainer(factory, args, actor, run_id: str, events, *, name: str, callbacks=(),
                       start_from=None, keep_checkpoints: int = 2, driver_node: str | None = None) -> TorchTrainer:
    """The Train V2 trainer for one run: workers built from ``factory``, records to ``actor``.

    ``name`` is the Train run name: relaunching with the same name resumes that run from its
    storage. ``callbacks`` are Ray Train ``UserCallback``s. ``start_from``, a picklable callable
    returning a local ``last.pt``, gives the starting checkpoint when the run has none of its own.
    ``driver_node`` is the node of the callback actor (default: this one); a worker on another
    node ships the files its records name to the object store (callbacks/artifacts.py).
    """
    storage_path, filesystem = storage_for(args.storage)
    return TorchTrainer(
        train_worker,
        train_loop_config={"factory": factory, "actor": actor, "run_id": run_id, "events": list(events),
                           "start_from": start_from,
                           "driver_node": driver_node or ray.get_runtime_context().get_node_id()},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker=args.resources_per_worker),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             callbacks=list(callbacks)),
    )


def log_report(report: dict) -> None:
    for failure in report.get("failures", []):
        LOGGER.warning(f"driver callback {failure['callback']} failed {failure['count']} times in "
                       f"{failure['event']}: {failure['first_error']}")


def train_worker(config: dict) -> None:
    """Body of each Ray Train worker: build the trainer from the factory and run it."""
    gc.freeze()  # imports and Ray's state, before set-up's own full collection (see freeze_setup_objects)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    extra = {"device": str(ray.train.torch.get_device())}
    latest = ray.train.get_checkpoint()  # set when Ray Train restarted the worker group
    resume = restore_checkpoint(latest) if latest is not None else None
    if resume is None and config.get("start_from") is not None:
        resume = config["start_from"]()
    if resume:
        extra["resume"] = resume
    trainer = config["factory"](**extra)
    meta = latest.get_metadata() if latest is not None else {}
    if "epoch" in meta:  # written by report_epoch (an older checkpoint has none: it trains on)
        trainer.resume_stop = bool(meta.get("stop"))  # a restart: continue as the run would have
    attempt = time.time_ns() // 1_000_000  # grows with each Ray Train restart of the worker group
    remote = ray.get_runtime_context().get_node_id() != config.get("driver_node")
    publish = ArtifactShipper(trainer.args.storage, config["run_id"], rank) if remote else None
    EventForwarder(config["actor"], config["run_id"], rank, attempt=attempt, events=config["events"],
                   publish=publish).attach(trainer.callbacks)
    trainer.add_callback("on_pretrain_routine_end", freeze_setup_objects)
    trainer.epoch_reporters.append(report_epoch)
    trainer.train()


def freeze_setup_objects(trainer) -> None:
    """Keep what set-up made (model, data, torch._dynamo that torch.optim imports) out of later
    garbage collections: a full collection rescans every tracked object (~0.2 s here), and
    forwarded records make one run every ~30 s at hundreds of steps/s. A worker process
    serves one run, so nothing frozen would have been freed anyway."""
    gc.freeze()


def restore_checkpoint(checkpoint: Checkpoint) -> str:
    """After a restart: this worker's local copy of the latest reported ``last.pt``."""
    local = Path(tempfile.mkdtemp(prefix="resume-")) / "last.pt"
    with checkpoint.as_directory() as folder:
        shutil.copy(Path(folder) / "last.pt", local)
    LOGGER.info(f"restarting from the latest checkpoint ({checkpoint.path})")
    return str(local)


def report_epoch(trainer) -> None:
    """Every rank reports once per epoch (a barrier); rank 0 attaches last.pt (uploaded async) with
    the epoch and the loop's stop vote of that epoch, which a restart continues from."""
    metrics = {k: float(v) for k, v in trainer.epoch_metrics().items()}
    metrics.update(epoch=trainer.epoch, fitness=float(trainer.fitness if trainer.fitness is not None else 0.0))
    checkpoint = None
    if trainer.is_main and trainer.last.is_file():
        folder = tempfile.mkdtemp(prefix="ckpt-")
        shutil.copy(trainer.last, Path(folder) / "last.pt")
        checkpoint = Checkpoint.from_directory(folder)
        checkpoint.set_metadata({"epoch": trainer.epoch, "stop": trainer.stop})
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=persist_patiently)


def nothing_left(checkpoint: Checkpoint, epochs: int) -> bool:
    """A run started from a checkpoint ``report_epoch`` wrote (a sweep trial's retry or resume) has
    nothing to train when that checkpoint ended the training: its last epoch, or the stop vote
    recorded with it. A checkpoint without the metadata (an older one) trains on. (A Ray Train
    restart hands the vote to the trainer instead: ``train_worker``.)"""
    meta = checkpoint.get_metadata()
    return "epoch" in meta and training_finished(int(meta["epoch"]), bool(meta.get("stop")), epochs)


UPLOAD_PATIENCE = 600.0  # seconds a checkpoint upload keeps retrying while the storage is unreachable
TRANSIENT = ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "INTERNAL_FAILURE", "REQUEST_TIMEOUT")


def transient(exc: OSError) -> bool:
    """An outage worth waiting for (not a missing file, bucket or permission)."""
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(t in str(exc) for t in TRANSIENT)


def persist_patiently(checkpoint, checkpoint_dir_name: str):
    """Ray Train's own upload, retried with backoff: Ray gives up after a few quick tries, which
    fails the whole run on a short storage outage; this only delays the checkpoint (async)."""
    storage = ray.train.get_context().get_storage()
    delay, end = 1.0, time.monotonic() + UPLOAD_PATIENCE
    while True:
        try:
            return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
        except OSError as exc:
            if not transient(exc) or time.monotonic() + delay > end:
                raise
            LOGGER.warning(f"checkpoint upload to {storage.storage_fs_path} failed, retrying in {delay:.0f}s: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
