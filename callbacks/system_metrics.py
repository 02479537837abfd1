"""System metrics of each node (CPU, memory, disk, network; GPU where MLflow can read one) with
MLflow's own monitor, as ``system/<node>/<metric>`` of the run's MLflow run.

One monitor per node: the process of the run's sinks (``NodeSampler``: the in-process run, or the
callback actor on the driver's node, which has MLflow loaded already) takes its node first; under
Ray a worker of each other node samples its own, the first to take the node's lock file (an OS
lock: freed when that process dies, so a restart takes it again; Ray Train's local rank cannot
tell nodes that share an IP apart). A worker on the actor's node finds the node taken and loads
nothing for it (MLflow and its database client cost a worker seconds of CPU at start-up). It samples
every ``system_metrics`` seconds (0 turns it off) and finds the MLflow run by the orchestrator's run
id (the callback actor may still be creating it). Samples go to MLflow directly, not through the run's
journal: they describe the machine, not the training, and one lost in an outage is not a lost record.
A restarted worker continues the step count (``resume_logging``), so no step is logged twice.
"""
from __future__ import annotations

import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from callbacks.sinks.base import Sink
from callbacks.sinks.mlflow_runs import find_run, mlflow_client
from trainers.utils import LOGGER, mlflow_level, try_lock

FIND_RUN_S = 120.0  # how long a monitor waits for the callback actor to create the MLflow run
POLL_S = 0.25  # between looks for it
STOP_WAIT_S = 5.0  # how long a rank's teardown waits for the monitor's last samples


def node_label(ray_node_id: str | None = None) -> str:
    """The host's name; with Ray, plus the start of the node id (nodes may share a host)."""
    host = socket.gethostname().split(".")[0]
    return f"{host}-{ray_node_id[:8]}" if ray_node_id else host


def this_node() -> str:
    """This process's node label: inside a Ray actor with the Ray node id, as that node's workers
    name it (so both contend for the same lock file); elsewhere the host's."""
    ray = sys.modules.get("ray")  # not imported: no Ray here
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        if context.get_actor_id() is not None:
            return node_label(context.get_node_id())
    return node_label()


def node_sampler(args, run_id: str) -> list:
    """The sampler of the run's sinks' node, for the run's callbacks; none when sampling is off."""
    if float(args.system_metrics or 0) > 0 and args.tracking_uri:
        return [NodeSampler(tracking_uri=args.tracking_uri, experiment=args.experiment,
                            system_metrics=args.system_metrics, run_id=run_id)]
    return []


class NodeMonitor:
    """Started at the trainer's ``on_pretrain_routine_start``, stopped at ``teardown``."""

    def __init__(self, args, run_id: str, node: str):
        """``args``: the run's (the driver pinned its tracking URI and experiment), or anything
        with its ``tracking_uri``, ``experiment`` and ``system_metrics``."""
        self.args, self.run_id, self.node = args, run_id, node
        self.monitor = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._claim = None  # the node's lock file, while this process samples the node

    def attach(self, trainer) -> None:
        if float(self.args.system_metrics or 0) > 0 and self.args.tracking_uri:
            trainer.add_callback("on_pretrain_routine_start", lambda _: self.start())
            trainer.add_callback("teardown", lambda _: self.stop())  # every rank, failures too

    def start(self) -> None:
        if self._claim_node():
            self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
            self._thread.start()

    def _claim_node(self) -> bool:
        """Whether this process samples the node: the first to lock the run's file for it."""
        folder = Path(tempfile.gettempdir()) / "orchestrator-system-metrics"
        folder.mkdir(exist_ok=True)
        self._claim = try_lock(folder / f"{self.run_id}-{self.node}.lock")
        return self._claim is not None

    def stop(self) -> None:
        """The monitor's samples so far, and one of this moment: a run shorter than the sampling
        interval (or than the callback actor's creating the MLflow run) still says what its node did.
        Waits ``STOP_WAIT_S`` at most: with MLflow down, MLflow's own retries would hold the rank's
        end for minutes, and samples are not records (the run's end must not wait for them)."""
        self._stopped.set()
        self._release_node()
        closing = threading.Thread(target=self._close, name="system-metrics-close", daemon=True)
        closing.start()
        closing.join(STOP_WAIT_S)
        if closing.is_alive():
            LOGGER.warning(f"system metrics: {self.node}'s last samples not logged within {STOP_WAIT_S:.0f} s "
                           "(MLflow slow or down); the run goes on without them")

    def _close(self) -> None:
        if self._thread is not None:
            self._thread.join()  # it looks for the MLflow run once more, at most
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.finish()
            self._last_sample(monitor)

    def _last_sample(self, monitor) -> None:
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001 - MLflow away at the end: the run goes on without it
            LOGGER.warning(f"system metrics: the last sample of {self.node} was not logged: {exc}")

    def _release_node(self) -> None:
        if self._claim is not None:
            Path(self._claim.name).unlink(missing_ok=True)
            self._claim.close()
            self._claim = None

    def _run(self) -> None:
        """Find the run, then sample in MLflow's thread; once stopped, leave the monitor for
        ``stop``'s one sample."""
        mlflow_run = self._wait_for_run()
        if mlflow_run is None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        quiet_monitor()
        self.monitor = SystemMetricsMonitor(mlflow_run, sampling_interval=float(self.args.system_metrics),
                                            resume_logging=True, node_id=self.node,
                                            tracking_uri=self.args.tracking_uri)
        if not self._stopped.is_set():
            self.monitor.start()

    def _wait_for_run(self) -> str | None:
        """The MLflow run's id; looked for every ``POLL_S`` until found, ``FIND_RUN_S`` passed or
        the monitor is stopped (then once more)."""
        client, deadline = mlflow_client(self.args.tracking_uri), time.monotonic() + FIND_RUN_S
        while True:
            run = self._find(client)
            if run is not None or self._stopped.is_set():
                return run
            if time.monotonic() > deadline:
                LOGGER.warning(f"system metrics: no MLflow run for {self.run_id} after {FIND_RUN_S:.0f} s")
                return None
            self._stopped.wait(POLL_S)

    def _find(self, client) -> str | None:
        try:
            run = find_run(client, self.args.experiment, self.run_id)
        except Exception as exc:  # noqa: BLE001 - a down server: try again, then give up quietly
            LOGGER.debug(f"system metrics: MLflow not reachable yet: {exc}")
            return None
        return run.info.run_id if run is not None else None


def quiet_monitor() -> None:
    """MLflow's monitor notes its start and stop at INFO, three lines on the user's console every
    run (in process: the driver's): its logger gets ``mlflow_level``."""
    logging.getLogger("mlflow.system_metrics").setLevel(mlflow_level())


class NodeSampler(Sink):
    """A run callback that samples the node it runs on, from ``start`` to ``close``: first among
    the callbacks, so its last sample is logged before the MLflow sink ends the run. It takes no
    event, and ``orchestrator recover`` does not rebuild it (a recovering machine is not the run's)."""

    events = frozenset()  # no event, so no rows: the dispatcher hands it none

    def start(self) -> None:
        self._monitor = NodeMonitor(self, self.run_id, this_node())
        self._monitor.start()

    def close(self, status: str = "FINISHED") -> dict:
        monitor = self.__dict__.pop("_monitor", None)
        if monitor is not None:
            monitor.stop()
        return {}
