"""Run a trainer on Ray Train workers (Train V2 ``TorchTrainer``), events to one driver actor.

Per-step data travels through the event forwarder; once per epoch every rank calls
``ray.train.report`` (a barrier) with the epoch metrics, rank 0 attaching ``last.pt``; once more
when Ray announces a node's preemption, with a mid-epoch ``last.pt`` (docs/faults.md, Preemption).
"""
from __future__ import annotations

import gc
import math
import os
import shutil
import socket
import time
import tempfile
import threading
from functools import partial
from pathlib import Path

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.execution import context as train_context
from ray.train.v2.api.config import LoggingConfig
from ray.train.torch import TorchTrainer

from callbacks.actor import HEARTBEAT, ray_log_file, start_callback_actor
from callbacks.artifacts import ArtifactShipper
from callbacks.forwarder import EventForwarder
from callbacks.sinks.s3 import S3Setup
from callbacks.system_metrics import NodeMonitor, node_label
from orchestrator.capacity import check_room, per_worker
from orchestrator.console import print_lines
from orchestrator.embedded_ray import record_session
from orchestrator.ray_quiet import quiet_console, quiet_driver
from orchestrator.results import take_back
from orchestrator.stops import STOP_POLL, RunStopped, StopListener, stop_grace
from trainers.config import describe_workers, worker_counts
from trainers.engine.preemption import Preempted
from trainers.engine.resume import training_finished
from trainers.utils import LOGGER, UserError, log_details_to


# A local Ray (started here) is one node that nothing preempts: Ray Train's preemption watcher
# would only be one more process to start for every run and trial.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def connect_ray(journal: str | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``), else start a local Ray, which
    is recorded under ``journal`` for ``orchestrator recover`` should this driver be killed
    (``orchestrator/embedded_ray.py``)."""
    quiet_driver()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        probe_address(address)
    try:
        ray.init(address=address or None, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": LOCAL_RAY_ENV} if address in (None, "", "local") else None)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc}".splitlines()[0]) from None
    if journal is not None:
        record_session(journal)


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


def storage_for(storage: str, s3: S3Setup | None = None) -> tuple[str, object | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for a local path or ``s3://bucket/prefix``
    (reached as the run's ``s3`` set-up says, like its other S3 traffic)."""
    if not storage.startswith("s3://"):
        path = Path(storage).resolve() / "ray"
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    return storage[len("s3://"):].rstrip("/") + "/ray", (s3 or S3Setup()).arrow_fs()


class RayBackend:
    """A ``RunSession`` backend: the driver callbacks in one callback actor, the trainer on Ray
    Train workers (``TorchTrainer.fit`` waits for them).

    ``defer_run``: the actor's MLflow sink creates the MLflow run while Ray starts the workers
    (MLflow's import and database set-up would otherwise delay the driver by seconds).
    """

    defer_run = True

    def __init__(self):
        self.actor = self.trainer = None
        self._beating = threading.Event()

    def connect(self, args) -> None:
        connect_ray(args.journal)
        check_room(worker_counts(args.num_workers)[0], per_worker(args.use_gpu, args.resources_per_worker),
                   f"num_workers={describe_workers(args.num_workers)}")

    def start(self, session) -> None:
        self.actor = start_callback_actor(session.callbacks, name=f"callbacks-{session.journal.dir.name}",
                                          namespace=ACTOR_NAMESPACE, journal=session.journal,
                                          orphan_after=ORPHAN_AFTER)
        threading.Thread(target=heartbeat, args=(self.actor, self._beating), name="heartbeat", daemon=True).start()
        # Ray Train's run name is the session's (its journal's folder: ``<run id>`` then ``<run id>.1``
        # ...): a restart within the session starts from its latest checkpoint, a ``resume=`` from
        # the checkpoint it names (a stop's mid-epoch last.pt is newer than any Ray Train has).
        self.trainer = make_torch_trainer(session.factory, session.args, self.actor, session.run_id,
                                          session.events, name=f"{session.args.name}-{session.journal.dir.name}")

    def train(self, session) -> None:
        """``fit()`` on a thread of its own, so that Ray Train installs no SIGINT handler of its own
        (it does on the main thread): Ctrl+C and SIGTERM stay ours (``orchestrator/stops.py``). On
        one, the workers are asked to stop at their next step and waited for, ``stop_grace()`` at
        most; the run then ends KILLED however far they got."""
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                self.trainer.fit()
            except BaseException as exc:  # handed to the waiting thread
                failure.append(exc)

        thread = threading.Thread(target=fit, name="train-fit", daemon=True)
        thread.start()
        deadline = math.inf
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(WAIT_STEP)  # a signal's handler runs between these waits
            if deadline == math.inf and session.stops.requested():
                deadline = self._ask_to_stop(session.stops.reason)
            self._print_console(session)
        self._print_console(session)
        if session.stops.requested():
            raise RunStopped(session.stops.reason)
        if failure:
            raise failure[0]

    def _ask_to_stop(self, reason: str) -> float:
        """Pass the stop to the workers through the callback actor; when to stop waiting for them."""
        grace = stop_grace()
        LOGGER.warning(f"{reason}: the workers stop at their next training step (waiting {grace:g} s at most; "
                       f"a second signal stops at once)")
        self.actor.request_stop.remote(reason)
        return time.monotonic() + grace

    def finish(self, session, status: str, reason: str | None = None) -> dict:
        """Close the actor's sinks with the run's status, then stop the actor (it serves one run)."""
        self._beating.set()
        if self.actor is None:  # start failed before the actor was up: nothing to close
            return {}
        report = ray.get(self.actor.finish.remote(status, reason))
        take_back(session.driver_callbacks, self._callback_objects(session))
        ray.kill(self.actor)
        log_report(report)
        return report

    def _print_console(self, session) -> None:
        """Print the console lines the actor made (``orchestrator/console.py``); a slow or restarting
        actor only delays them."""
        if session.console is None:
            return
        try:
            print_lines(ray.get(self.actor.take_lines.remote(), timeout=10))
        except (ray.exceptions.RayError, TimeoutError):
            pass

    def _callback_objects(self, session) -> list:
        """The user's driver callbacks as the actor left them; none when they cannot travel back."""
        try:
            return ray.get(self.actor.callback_objects.remote(len(session.callbacks) - len(session.driver_callbacks)))
        except Exception as exc:  # e.g. a callback that gathered an unpicklable object
            LOGGER.warning(f"the driver callbacks' final state stays in the callback actor: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return []

    def outcome(self) -> dict:
        """Nothing beyond the session's result: the trainers lived in the workers."""
        return {}


WAIT_STEP = 0.5  # seconds between the driver's looks at a stop signal and the console's lines
ACTOR_NAMESPACE = "orchestrator"  # a detached actor's namespace (it outlives the driver's own)
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
    returning a local ``last.pt`` in a folder of its own (removed once the run ends on the worker),
    gives the starting checkpoint when the run has none of its own.
    ``driver_node`` is the node of the callback actor (default: this one); a worker on another
    node ships the files its records name to the object store (callbacks/artifacts.py).
    """
    storage_path, filesystem = storage_for(args.storage, S3Setup.of(args))
    return TorchTrainer(
        train_worker,
        train_loop_config={"factory": factory, "actor": actor, "run_id": run_id, "events": list(events),
                           "start_from": start_from,
                           "driver_node": driver_node or ray.get_runtime_context().get_node_id()},
        scaling_config=scaling_config(args),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=args.max_failures,
                                                          max_preemption_failures=args.max_preemptions),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             callbacks=list(callbacks), logging_config=RAY_TRAIN_LOGGING),
    )


def scaling_config(args) -> ScalingConfig:
    """A fixed worker group, or for a range ``num_workers`` an elastic one: Ray Train starts it with
    the workers the cluster has room for (at least min) and, every ``resize_interval`` s, restarts it
    from the latest checkpoint at a new size when that changed (the trainer fires ``on_resize``)."""
    low, high = worker_counts(args.num_workers)
    return ScalingConfig(num_workers=high if low == high else (low, high), use_gpu=args.use_gpu,
                         resources_per_worker=args.resources_per_worker,
                         elastic_resize_monitor_interval_s=args.resize_interval)


def log_report(report: dict) -> None:
    for failure in report.get("failures", []):
        LOGGER.warning(f"driver callback {failure['callback']} failed {failure['count']} times in "
                       f"{failure['event']}: {failure['first_error']}")


# Ray Train's own INFO lines (each report's metrics, its failure-policy decisions) stay in Ray's log
# files: the user's console has the run's own lines.
RAY_TRAIN_LOGGING = LoggingConfig(log_level="WARNING")


def train_worker(config: dict) -> None:
    """Body of each Ray Train worker: build the trainer from the factory and run it."""
    quiet_console()
    gc.freeze()  # imports and Ray's state, before set-up's own full collection (see freeze_setup_objects)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    log_details_to(ray_log_file(f"{config['run_id']}-rank{rank}-{os.getpid()}.log"))
    extra = {"device": str(ray.train.torch.get_device())}
    latest = ray.train.get_checkpoint()  # set when Ray Train restarted the worker group
    resume = local_start(config, latest)
    if resume:
        extra["resume"] = resume
    trainer = config["factory"](**extra)
    meta = latest.get_metadata() if latest is not None else {}
    if "epoch" in meta:  # written by report_epoch (an older checkpoint has none: it trains on)
        trainer.resume_stop = bool(meta.get("stop"))  # a restart: continue as the run would have
    forwarder = forward_records(config, trainer, rank)
    node = node_label(ray.get_runtime_context().get_node_id())
    NodeMonitor(trainer.args, config["run_id"], node).attach(trainer)  # one of a node's workers samples it
    trainer.add_callback("on_pretrain_routine_end", freeze_setup_objects)
    trainer.epoch_reporters += [partial(deliver_before_report, forwarder), partial(report_epoch, config["run_id"])]
    trainer.preemption_reporters.append(partial(deliver_before_report, forwarder))
    stop = StopListener(config["actor"])
    if rank == 0:
        stop.listen()
    listen_for_notices(trainer, stop)
    try:
        trainer.train()
    except Preempted as preempted:
        if not trainer.stopping:
            wait_for_restart(preempted, stop)
    finally:
        stop.close()
        if resume:
            shutil.rmtree(Path(resume).parent, ignore_errors=True)


def local_start(config: dict, latest: Checkpoint | None) -> str | None:
    """The local ``last.pt`` this worker starts from: Ray Train's latest checkpoint after a
    restart, else the run's ``start_from`` (a sweep trial's exploited checkpoint). Each is a copy
    in a folder of its own, removed when the run ends on this worker (a checkpoint of a large
    model per restart would otherwise pile up in the temp folder)."""
    if latest is not None:
        return restore_checkpoint(latest)
    return config["start_from"]() if config.get("start_from") is not None else None


def forward_records(config: dict, trainer, rank: int) -> EventForwarder:
    """This rank's event forwarder to the run's actor; a rank on another node than the driver
    ships its files through the object store."""
    attempt = time.time_ns() // 1_000_000  # grows with each Ray Train restart of the worker group
    remote = ray.get_runtime_context().get_node_id() != config.get("driver_node")
    publish = ArtifactShipper(trainer.args.storage, config["run_id"], rank, S3Setup.of(trainer.args)) \
        if remote else None
    return EventForwarder(config["actor"], config["run_id"], rank, attempt=attempt, events=config["events"],
                          publish=publish).attach(trainer.callbacks)


DELIVERY_TIMEOUT = 60.0  # s a report waits for the actor's acknowledgements (an actor restart takes seconds)


def deliver_before_report(forwarder: EventForwarder, trainer) -> None:
    """Wait until the actor has journaled this rank's records so far, then report. A restart
    continues after the reported checkpoint and never emits what came before it again, so a rank
    lost right after its report would otherwise take the epoch's last records with it. Bounded
    (a warning says what is unacknowledged): an actor that does not come back must not hang the
    run; records behind files still shipping to the store are not waited for (an S3 outage)."""
    forwarder.deliver(timeout=DELIVERY_TIMEOUT)


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
    LOGGER.warning(f"restarting from the latest checkpoint ({checkpoint.path})")
    return str(local)


def report_epoch(run_id: str, trainer) -> None:
    """Every rank reports once per epoch (a barrier); rank 0 attaches last.pt (uploaded async) with
    the epoch and the loop's stop vote of that epoch, which a restart continues from, and the run
    it belongs to (a sweep trial that starts from another trial's checkpoint tells it by that)."""
    metrics = epoch_report_metrics(trainer)
    checkpoint = None
    if trainer.is_main and trainer.last.is_file():
        checkpoint = checkpoint_of(trainer.last, {"epoch": trainer.epoch, "stop": trainer.stop, "run_id": run_id})
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=persist_patiently)


def epoch_report_metrics(trainer) -> dict:
    """An epoch's report metrics: what a sweep hands Tune and computes its objective from."""
    metrics = {k: float(v) for k, v in trainer.epoch_metrics().items()}
    metrics.update(epoch=trainer.epoch, fitness=float(trainer.fitness if trainer.fitness is not None else 0.0))
    return metrics


def checkpoint_of(path: Path, metadata: dict) -> Checkpoint:
    """A Ray Train checkpoint of a copy of ``path`` (last.pt, which the next save overwrites), with
    the ``metadata`` a restart reads."""
    folder = tempfile.mkdtemp(prefix="ckpt-")
    shutil.copy(path, Path(folder) / "last.pt")
    checkpoint = Checkpoint.from_directory(folder)
    checkpoint.set_metadata(metadata)
    return checkpoint


MID_EPOCH = "mid_epoch_batch"  # in a preemption's report: the batches of its epoch trained before it


def listen_for_notices(trainer, stop: StopListener) -> None:
    """Ray Train's notice of a node's preemption, or the driver's stop request, reaches the
    trainer's loop: at the next optimizer step the ranks agree on, it saves a mid-epoch checkpoint,
    ``report_mid_epoch`` reports a preemption's, and the loop raises ``Preempted``
    (docs/faults.md, Preemption)."""
    trainer.preemption_notice = lambda: stop.notice() or preemption_notice()
    trainer.preemption_reporters.append(report_mid_epoch)


def preemption_notice() -> bool:
    """Whether Ray Train marked this worker's group with a preemption: the value
    ``ray.train.get_preemption_info()`` broadcasts from rank 0, read here without that call's
    barrier through a Ray actor (~3 ms a call); the trainer's vote agrees across ranks instead."""
    return train_context.get_train_context().preemption_context.preemption_info is not None


def report_mid_epoch(trainer) -> None:
    """Every rank reports a preemption's mid-epoch checkpoint; rank 0 attaches last.pt, uploaded
    before this returns (the node is about to go). Its metadata has no ``epoch``: neither a
    restart's stop vote nor a sweep's ``nothing_left`` takes it for the end of one. Sweeps skip the
    report itself (``is_epoch_report``). A stop's is not reported: the run ends, and last.pt in the
    run folder is what ``resume=`` takes (Ray Train's report, a barrier, would use up the stop's grace)."""
    if trainer.stopping:
        return
    batch = trainer.data_position["batch"]
    checkpoint = checkpoint_of(trainer.last, {MID_EPOCH: batch}) if trainer.is_main else None
    ray.train.report({"epoch": trainer.epoch, MID_EPOCH: batch}, checkpoint=checkpoint,
                     checkpoint_upload_fn=persist_patiently)


def is_epoch_report(metrics: dict) -> bool:
    """Whether rank 0's metrics of a report are an epoch's (``report_epoch``), not a preemption's."""
    return MID_EPOCH not in metrics


def wait_for_restart(preempted: Preempted, stop: StopListener) -> None:
    """Hold this worker until Ray Train stops the group, at the notice's deadline, and restarts the
    run from the mid-epoch checkpoint: returning would end the run as finished, and any step
    trained from here on would be lost with the node. A stop request meanwhile ends the run."""
    LOGGER.warning(f"{preempted}; waiting for Ray Train to restart the run")
    stop.listen()
    while not stop.requested():
        time.sleep(STOP_POLL)


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
