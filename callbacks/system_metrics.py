"""System metrics of each node (CPU, memory, disk, network; GPU where MLflow can read one) with
MLflow's own monitor, as ``system/<node>/<metric>`` of the run's MLflow run.

One monitor per node: the in-process run, or the first worker of each node under Ray. It samples
every ``system_metrics`` seconds (0 turns it off) and finds the MLflow run by the orchestrator's run
id (the callback actor may still be creating it). Samples go to MLflow directly, not through the run's
journal: they describe the machine, not the training, and one lost in an outage is not a lost record.
A restarted worker continues the step count (``resume_logging``), so no step is logged twice.
"""
from __future__ import annotations

import socket
import threading

from callbacks.sinks.mlflow_runs import find_run, mlflow_client
from trainers.utils import LOGGER

FIND_RUN_S = 120.0  # how long a monitor waits for the callback actor to create the MLflow run


def node_label(ray_node_id: str | None = None) -> str:
    """The host's name; with Ray, plus the start of the node id (nodes may share a host)."""
    host = socket.gethostname().split(".")[0]
    return f"{host}-{ray_node_id[:8]}" if ray_node_id else host


class NodeMonitor:
    """Started at the trainer's ``on_pretrain_routine_start``, stopped at ``on_train_end``."""

    def __init__(self, args, run_id: str, node: str):
        """``args``: the run's (the driver pinned its tracking URI and experiment)."""
        self.args, self.run_id, self.node = args, run_id, node
        self.monitor = None
        self._stopped = threading.Event()

    def attach(self, trainer) -> None:
        if float(self.args.system_metrics or 0) > 0 and self.args.tracking_uri:
            trainer.add_callback("on_pretrain_routine_start", lambda _: self.start())
            trainer.add_callback("on_train_end", lambda _: self.stop())

    def start(self) -> None:
        threading.Thread(target=self._run, name="system-metrics", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        if self.monitor is not None:
            self.monitor.finish()

    def _run(self) -> None:
        mlflow_run = self._wait_for_run()
        if mlflow_run is None or self._stopped.is_set():
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(mlflow_run, sampling_interval=float(self.args.system_metrics),
                                            resume_logging=True, node_id=self.node,
                                            tracking_uri=self.args.tracking_uri)
        self.monitor.start()

    def _wait_for_run(self) -> str | None:
        client = mlflow_client(self.args.tracking_uri)
        for _ in range(int(FIND_RUN_S)):
            try:
                run = find_run(client, self.args.experiment, self.run_id)
            except Exception as exc:  # noqa: BLE001 - a down server: try again, then give up quietly
                LOGGER.debug(f"system metrics: MLflow not reachable yet: {exc}")
                run = None
            if run is not None:
                return run.info.run_id
            if self._stopped.wait(1.0):
                return None
        LOGGER.warning(f"system metrics: no MLflow run for {self.run_id} after {FIND_RUN_S:.0f} s; not logged")
        return None
