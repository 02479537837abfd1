"""`orchestrator stack` refusing bad input and taken ports, and `orchestrator ui`, run as real CLI
processes. The stack's life (up, status, env, a second up, down) is checked on the stack that
tests/test_job_submit.py starts for its jobs: starting one costs ~20 s.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infra.local import procs
from tests.servers import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def clean_env() -> dict:
    """This environment without anything pointing at another Ray, MLflow or S3."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "MLFLOW_TRACKING"))}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def orchestrator(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stack_dir(tmp_path):
    yield tmp_path
    if (tmp_path / "runs" / "stack" / "stack.json").exists():  # whatever happened, stop what was started
        orchestrator(tmp_path, "stack", "down")


@pytest.mark.parametrize("args, message", [
    (["stack"], "usage: orchestrator stack up|down|status|env"),
    (["stack", "start"], "usage: orchestrator stack up|down|status|env"),
    (["stack", "up", "mlflow_prot=5000"], "unknown option 'mlflow_prot'; did you mean 'mlflow_port'?"),
    (["stack", "up", "s3_port=abc"], "s3_port must be an integer, got 'abc'"),
    (["stack", "up", "ray_port=70000"], "ray_port=70000 is not a port number"),
    (["stack", "up", "mlflow_port=7000", "s3_port=7000"], "is used twice"),
    (["stack", "up", "bucket=Bad_Bucket"], "bucket='Bad_Bucket' is not a valid S3 bucket name"),
    (["stack", "down", "force=1"], "unknown option 'force'"),
    (["ui", "port=http"], "ui: port='http' is not a port number"),
    (["ui", "browser=1"], "unknown option 'browser' for ui"),
])
def test_bad_input_is_one_line_user_error(tmp_path, args, message):
    out = orchestrator(tmp_path, *args, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr
    assert not (tmp_path / "runs" / "stack" / "stack.json").exists()  # nothing was started or recorded


def test_up_refuses_a_port_taken_by_another_process(stack_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        others = distinct_ports(3)
        out = orchestrator(stack_dir, "stack", "up", f"mlflow_port={taken}", f"s3_port={others[0]}",
                           f"ray_port={others[1]}", f"dashboard_port={others[2]}", timeout=60)
    assert out.returncode == 2
    assert f"mlflow_port={taken}" in out.stderr and "already in use" in out.stderr
    assert not (stack_dir / "runs" / "stack" / "stack.json").exists()  # nothing started


def test_ui_serves_the_embedded_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    MlflowClient(uri).create_experiment("ui-check")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", f"port={port}", f"tracking_uri={uri}"],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout=90, proc=proc)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert json.loads(resp.read())["experiment"]["name"] == "ui-check"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        said, _ = proc.communicate(timeout=30)
    said = said.decode()  # the UI's own lines: no line per request, no deprecation warning of its libraries
    assert " - \"GET " not in said and "DeprecationWarning" not in said and "Uvicorn running" not in said, said
    assert procs.wait_port_closed(port)
    deadline = time.monotonic() + 10
    while procs.group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not procs.group_members(proc.pid)


def test_ui_on_a_server_points_to_it(tmp_path):
    out = orchestrator(tmp_path, "ui", "tracking_uri=http://127.0.0.1:5999", timeout=60)
    assert out.returncode == 0 and "serves the UI itself, open http://127.0.0.1:5999" in out.stdout
