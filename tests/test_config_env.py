"""The ecosystem's environment variables fill config keys that are not given; a given key wins.

MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME and the standard AWS variables (endpoint, region,
profile) are honoured before default.yaml; the run's args (args.yaml, MLflow params) show the value
used, and the driver pins it for workers whose environment differs.
"""
from __future__ import annotations

import yaml
from mlflow.tracking import MlflowClient

from orchestrator import Model
from orchestrator.run_setup import experiment_name, resolve_run
from trainers.config import DEFAULTS, ENV_VARS, get_cfg

ENV = {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "MLFLOW_EXPERIMENT_NAME": "from-env",
       "AWS_ENDPOINT_URL": "http://s3.example:9000", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_PROFILE": "team"}


def set_env(monkeypatch, values: dict) -> None:
    """Exactly ``values`` among the variables config reads (nothing leaks from the caller's shell)."""
    for names in ENV_VARS.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_environment_fills_the_keys_not_given(monkeypatch):
    set_env(monkeypatch, ENV)
    args = get_cfg()
    assert (args.tracking_uri, args.experiment) == ("http://mlflow.example:5000", "from-env")
    assert (args.s3_endpoint, args.s3_region, args.s3_profile) == ("http://s3.example:9000", "eu-west-1", "team")
    assert experiment_name(get_cfg(None, {"project": "runs/mine"})) == "from-env"  # experiment, not project
    set_env(monkeypatch, {})
    args = get_cfg()
    assert (args.tracking_uri, args.experiment, args.s3_endpoint) == (DEFAULTS["tracking_uri"], None, None)
    assert experiment_name(get_cfg(None, {"project": "runs/mine"})) == "mine"


def test_a_given_key_beats_the_environment(monkeypatch, tmp_path):
    set_env(monkeypatch, {**ENV, "AWS_ENDPOINT_URL_S3": "http://s3-only.example:9000"})
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("tracking_uri: sqlite:///from-file.db\ns3_region: us-west-2\n")
    args = get_cfg(str(cfg), {"experiment": "given", "s3_profile": "mine"})
    assert (args.tracking_uri, args.experiment, args.s3_region, args.s3_profile) == (
        "sqlite:///from-file.db", "given", "us-west-2", "mine")
    assert args.s3_endpoint == "http://s3-only.example:9000"  # AWS_ENDPOINT_URL_S3 before AWS_ENDPOINT_URL


def test_driver_pins_what_it_resolved_for_workers(monkeypatch, tmp_path):
    set_env(monkeypatch, ENV)
    args = get_cfg(None, {"project": str(tmp_path / "p"), "journal": str(tmp_path / "j")})
    pinned = resolve_run(args)
    set_env(monkeypatch, {"MLFLOW_TRACKING_URI": "http://elsewhere:5000", "AWS_PROFILE": "other"})
    worker = get_cfg(None, pinned)  # a worker with another environment builds the same args
    assert (worker.tracking_uri, worker.experiment, worker.s3_endpoint, worker.s3_region, worker.s3_profile) == (
        "http://mlflow.example:5000", "from-env", "http://s3.example:9000", "eu-west-1", "team")


def test_run_goes_where_the_environment_says_and_shows_it(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    set_env(monkeypatch, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "env-exp"})
    Model("cls-n.yaml").train(data="digits", epochs=1, imgsz=16, fraction=0.05, verbose=False, plots=False,
                              project=str(tmp_path / "digits"), name="env", storage=str(tmp_path / "store"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("env-exp").experiment_id])
    assert run.data.params["tracking_uri"] == uri and run.data.params["experiment"] == "env-exp"
    saved = yaml.safe_load((tmp_path / "digits" / "env" / "args.yaml").read_text())
    assert (saved["tracking_uri"], saved["experiment"]) == (uri, "env-exp")
