"""`orchestrator stack up|status|env|down` and `orchestrator ui`, run as real CLI processes.

The stack's servers (moto S3, mlflow server, Ray head) bind free ports on 127.0.0.1 and live
in a temporary working directory; the test checks each one does its job, not just that it runs.
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
from infra.local.stack import Stack, stop_service
from tests.servers import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT_KEYS = ("mlflow_port", "s3_port", "ray_port", "dashboard_port")


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


def states(status_out: str) -> dict[str, str]:
    """service -> state word from `stack status` lines like '  mlflow up  http://...'."""
    out = {}
    for line in status_out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("s3", "mlflow", "ray"):
            out[words[0]] = words[1]
    return out


def exports(env_out: str) -> dict[str, str]:
    pairs = [line[len("export "):].split("=", 1) for line in env_out.splitlines() if line.startswith("export ")]
    return dict(pairs)


@pytest.fixture
def stack_dir(tmp_path):
    yield tmp_path
    if (tmp_path / "runs" / "stack" / "stack.json").exists():  # whatever happened, stop what was started
        orchestrator(tmp_path, "stack", "down")


def test_stack_up_status_env_down(stack_dir):
    ports = dict(zip(PORT_KEYS, distinct_ports(len(PORT_KEYS))))
    args = [f"{k}={v}" for k, v in ports.items()] + ["bucket=stack-test", "mlflow_workers=1", "num_cpus=1"]
    up = orchestrator(stack_dir, "stack", "up", *args)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((stack_dir / "runs" / "stack" / "stack.json").read_text())
    pids = {name: entry["pid"] for name, entry in state["pids"].items()}
    assert set(pids) == {"s3", "mlflow", "ray"}
    for name, pid in pids.items():  # detached: they outlived the `up` process
        assert procs.alive(pid), name
        assert (stack_dir / "runs" / "stack" / f"{name}.pid").read_text().strip() == str(pid)

    status = orchestrator(stack_dir, "stack", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert states(status.stdout) == {"s3": "up", "mlflow": "up", "ray": "up"}

    env = exports(orchestrator(stack_dir, "stack", "env").stdout)
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow_port']}"
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3_port']}"
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ports['ray_port']}"
    assert env["RAY_AUTH_MODE"] == "token"
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token_file.stat().st_mode & 0o077 == 0  # readable by the owner only
    assert token_file.read_text() not in up.stdout + up.stderr  # the token is never printed
    assert (stack_dir / "runs" / "stack" / "env.sh").read_text().count("export ") == len(env)

    import boto3
    from mlflow.tracking import MlflowClient

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    assert "stack-test" in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    # MLflow answers, and keeps the artifacts it proxies on disk, beside its database.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert [e.name for e in client.search_experiments()] == ["Default"]
    run = client.create_run(client.create_experiment("stack-check"))
    note = stack_dir / "note.txt"
    note.write_text("stored through the MLflow artifact proxy")
    client.log_artifact(run.info.run_id, str(note))
    stored = list((stack_dir / "runs" / "stack" / "mlartifacts").rglob("note.txt"))
    assert [p.parent.parent.name for p in stored] == [run.info.run_id], stored

    # Ray: GCS and dashboard answer; a job submitted with the printed settings runs on the head.
    assert procs.port_open(ports["ray_port"])
    job = subprocess.run([str(BIN / "ray"), "job", "submit", "--", sys.executable, "-c",
                          "import os, ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'], "
                          "'s3', os.environ['AWS_ENDPOINT_URL'], 'mlflow', os.environ['MLFLOW_TRACKING_URI'])"],
                         cwd=stack_dir, env={**clean_env(), **env}, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    # a job's driver finds S3 and MLflow in the head's environment (no tracking_uri= needed)
    assert f"cpus 1.0 s3 {env['AWS_ENDPOINT_URL']} mlflow {env['MLFLOW_TRACKING_URI']}" in job.stdout
    unauthenticated = {**clean_env(), "RAY_API_SERVER_ADDRESS": env["RAY_API_SERVER_ADDRESS"], "HOME": str(stack_dir)}
    denied = subprocess.run([str(BIN / "ray"), "job", "list"], cwd=stack_dir, env=unauthenticated,
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()

    # Idempotent: a second `up` keeps the running servers.
    again = orchestrator(stack_dir, "stack", "up")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already running") == 3
    assert json.loads((stack_dir / "runs" / "stack" / "stack.json").read_text())["pids"].keys() == pids.keys()
    assert {n: e["pid"] for n, e in json.loads((stack_dir / "runs" / "stack" / "stack.json").read_text())
            ["pids"].items()} == pids

    # MLflow and S3 stopped as `down` stops them, then `up` again: the old run's artifact still
    # downloads. (The Ray head stays up: restarting it would add 25 s and test nothing more.)
    for name in ("mlflow", "s3"):
        assert stop_service(Stack(stack_dir / "runs" / "stack"), name)
    restarted = orchestrator(stack_dir, "stack", "up")
    assert restarted.returncode == 0 and restarted.stdout.count("already running") == 1, restarted.stderr
    fetched = Path(MlflowClient(env["MLFLOW_TRACKING_URI"]).download_artifacts(
        run.info.run_id, "note.txt", str(stack_dir / "fetched")))
    assert fetched.read_text() == "stored through the MLflow artifact proxy"
    pids = {n: e["pid"] for n, e in json.loads((stack_dir / "runs" / "stack" / "stack.json").read_text())
            ["pids"].items()}

    down = orchestrator(stack_dir, "stack", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    for name, pid in pids.items():
        assert not procs.group_members(pid), f"{name} left processes behind"
    for port in ports.values():
        assert procs.wait_port_closed(port)
    after = orchestrator(stack_dir, "stack", "status")
    assert after.returncode == 1
    assert states(after.stdout) == {"s3": "down", "mlflow": "down", "ray": "down"}



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
        proc.wait(30)
    assert procs.wait_port_closed(port)
    deadline = time.monotonic() + 10
    while procs.group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not procs.group_members(proc.pid)


def test_ui_on_a_server_points_to_it(tmp_path):
    out = orchestrator(tmp_path, "ui", "tracking_uri=http://127.0.0.1:5999", timeout=60)
    assert out.returncode == 0 and "serves the UI itself, open http://127.0.0.1:5999" in out.stdout
