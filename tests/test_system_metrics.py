"""System metrics: MLflow's monitor samples the node into the run as ``system/<node>/...``, each
step once; ``system_metrics=0`` turns it off."""
import logging
import socket
import time

from mlflow.tracking import MlflowClient

from orchestrator import Model
from tests.helpers import QUICK, system_series
from tests.servers import mlflow_store


class Said(logging.Handler):
    """What a logger hands its handlers: the lines the console would print."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_an_in_process_run_logs_its_node_s_system_metrics_each_step_once(tmp_path, monkeypatch):
    uri = mlflow_store(tmp_path / "mlflow.db")
    where = dict(project=str(tmp_path / "runs"), tracking_uri=uri, storage=str(tmp_path / "store"),
                 journal=str(tmp_path / "journal"))
    model = Model("cls-n.yaml")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)  # as in a user's script (the CLI sets it)
    said = Said()
    monitor_log = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    monitor_log.addHandler(said)
    try:
        model.train(**{**QUICK, "epochs": 3, "fraction": 0.2}, **where, name="sampled", system_metrics=0.1)
    finally:
        monitor_log.removeHandler(said)
    assert said.lines == []  # MLflow's monitor noted its start and stop on the console, three lines a run
    client = MlflowClient(uri)
    series = system_series(client, model.mlflow_run_id)
    host = socket.gethostname().split(".")[0]
    assert {k.split("/")[1] for k in series} == {host}
    assert {f"system/{host}/cpu_utilization_percentage", f"system/{host}/system_memory_usage_megabytes"} <= set(series)
    steps = series[f"system/{host}/cpu_utilization_percentage"]
    assert len(steps) >= 2 and steps == list(range(len(steps)))
    model.train(**QUICK, **where, name="quiet", system_metrics=0)
    assert system_series(client, model.mlflow_run_id) == {}


def test_a_rank_s_end_waits_a_bounded_time_for_an_unreachable_mlflow(tmp_path, warnings_seen, monkeypatch):
    """With MLflow down, MLflow's own retries would hold the rank's teardown for minutes: the monitor
    gives up its last samples after ``STOP_WAIT_S`` and says so."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)  # a Ray worker's: MLflow's defaults (an in-process run shortens them)
    from callbacks.system_metrics import STOP_WAIT_S, NodeMonitor
    from tests.servers import free_port
    from trainers.config import get_cfg

    args = get_cfg(None, {"tracking_uri": f"http://127.0.0.1:{free_port()}", "system_metrics": 0.1,
                          "experiment": "down"})
    monitor = NodeMonitor(args, "down-run", f"node-{tmp_path.name}")
    monitor.start()
    time.sleep(1.0)  # it is looking for the run, inside MLflow's retries
    started = time.monotonic()
    monitor.stop()
    took = time.monotonic() - started
    assert took < STOP_WAIT_S + 1.0, f"teardown waited {took:.1f} s"
    assert any("last samples not logged" in r.getMessage() for r in warnings_seen)
