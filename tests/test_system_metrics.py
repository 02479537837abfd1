"""System metrics: MLflow's monitor samples the node into the run as ``system/<node>/...``, each
step once; ``system_metrics=0`` turns it off."""
import socket

from mlflow.tracking import MlflowClient

from orchestrator import Model
from tests.helpers import QUICK, system_series


def test_an_in_process_run_logs_its_node_s_system_metrics_each_step_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    where = dict(project=str(tmp_path / "runs"), tracking_uri=uri, storage=str(tmp_path / "store"),
                 journal=str(tmp_path / "journal"))
    model = Model("cls-n.yaml")
    model.train(**{**QUICK, "epochs": 3, "fraction": 0.2}, **where, name="sampled", system_metrics=0.1)
    client = MlflowClient(uri)
    series = system_series(client, model.mlflow_run_id)
    host = socket.gethostname().split(".")[0]
    assert {k.split("/")[1] for k in series} == {host}
    assert {f"system/{host}/cpu_utilization_percentage", f"system/{host}/system_memory_usage_megabytes"} <= set(series)
    steps = series[f"system/{host}/cpu_utilization_percentage"]
    assert len(steps) >= 2 and steps == list(range(len(steps)))
    model.train(**QUICK, **where, name="quiet", system_metrics=0)
    assert system_series(client, model.mlflow_run_id) == {}
