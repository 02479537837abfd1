"""`orchestrator stack up|status|env|down` and `ray job submit` end to end against that stack: a
training run, a sweep, a stopped job and a killed driver as Ray jobs.

The stack (moto S3, an MLflow server with artifacts on disk, a Ray head with token auth) is started
with `orchestrator stack up` on free ports in a temporary folder and stopped at the end, checked to
leave nothing running. Jobs get
the repository as their working directory, as `ray job submit --working-dir .` does; the training
job's driver finds S3 and MLflow through the head's environment (the sweep's through `tracking_uri=`).
The checks read what a user would look at: the job status, the MLflow runs and the objects in the bucket.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.local import procs
from infra.local.stack import Stack, stop_service
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "jobs-e2e"
EXCLUDES = [".git", ".venv", "runs", "datasets", "mlruns", "*.egg-info", ".pytest_cache", "__pycache__"]
JOB_TIMEOUT = 420
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

pytestmark = pytest.mark.timeout(900)


def orchestrator(*args: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "orchestrator"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_exports(text: str) -> dict:
    """``export KEY=VALUE`` lines of ``orchestrator stack env``."""
    return {m[1]: shlex.split(m[2])[0] if m[2] else "" for m in re.finditer(r"^export (\w+)=(.*)$", text, re.M)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local stack on free ports; yields its exported settings; always stopped at the end,
    where ``stack down`` is checked to leave no process and no open port behind."""
    where = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # an activated venv: `python` is ours
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT)  # `infra` is not part of the installed package
    ports = {k: free_port() for k in ("mlflow_port", "s3_port", "ray_port", "dashboard_port")}
    up = orchestrator("stack", "up", *(f"{k}={v}" for k, v in ports.items()), f"bucket={BUCKET}",
                      "num_cpus=4", "mlflow_workers=1", cwd=where, env=env, timeout=400)
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        exports = read_exports(orchestrator("stack", "env", cwd=where, env=env).stdout)
        assert exports["RAY_AUTH_MODE"] == "token"
        token = Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        yield {"env": env, "exports": exports, "token": token, "where": where, "ports": ports, "up": up,
               "mlflow": exports["MLFLOW_TRACKING_URI"], "dashboard": exports["RAY_API_SERVER_ADDRESS"]}
    finally:
        pids = stack_pids(where) if (where / "runs" / "stack" / "stack.json").exists() else {}
        down = orchestrator("stack", "down", cwd=where, env=env, timeout=120)
        assert down.returncode == 0, f"stack down failed:\n{down.stdout}\n{down.stderr}"
        for name, pid in pids.items():
            assert not procs.group_members(pid), f"{name} left processes behind"
        assert all(procs.wait_port_closed(port) for port in ports.values())
        after = orchestrator("stack", "status", cwd=where, env=env)
        assert after.returncode == 1 and states(after.stdout) == {"s3": "down", "mlflow": "down", "ray": "down"}


def stack_pids(where: Path) -> dict[str, int]:
    return {name: entry["pid"] for name, entry in
            json.loads((where / "runs" / "stack" / "stack.json").read_text())["pids"].items()}


def states(status_out: str) -> dict[str, str]:
    """service -> state word from `stack status` lines like '  mlflow up  http://...'."""
    words = [line.split() for line in status_out.splitlines()]
    return {w[0]: w[1] for w in words if len(w) >= 2 and w[0] in ("s3", "mlflow", "ray")}


@pytest.fixture(scope="module")
def jobs(stack):
    """Ray's Jobs SDK client, authenticated with the stack's token."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(stack["dashboard"], headers={"Authorization": f"Bearer {stack['token']}"})


@pytest.fixture
def aws(stack, monkeypatch):
    """This process reads the bucket like any S3 client would: endpoint and keys from the env."""
    for key, value in stack["exports"].items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    import boto3

    return boto3.client("s3", endpoint_url=stack["exports"]["AWS_ENDPOINT_URL"])


def wait_for(jobs, submission_id: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT
    status = str(jobs.get_job_status(submission_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(2)
        status = str(jobs.get_job_status(submission_id))
    return status.split(".")[-1]


def job_failure(jobs, submission_id: str, status: str) -> str:
    logs = jobs.get_job_logs(submission_id)
    return f"job {submission_id} ended {status}; last log lines:\n" + "\n".join(logs.splitlines()[-40:])


def keys_under(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


# ------------------------------------------------------------------------------------------ tests
def test_jobs_api_refuses_a_client_without_the_token(stack):
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match=r"(?i)auth|token|401|403|unauthori"):
        JobSubmissionClient(stack["dashboard"], headers={"Authorization": "Bearer not-the-token"}).list_jobs()


def test_stack_status_env_and_a_second_up(stack):
    """The servers `stack up` started outlive it, `status` and `env` describe them, a second `up`
    keeps them, and one that finds MLflow and S3 stopped starts just those again (MLflow's
    artifacts are on disk: a run's file still downloads)."""
    import boto3
    from mlflow.tracking import MlflowClient

    where, env, exports, ports = stack["where"], stack["env"], stack["exports"], stack["ports"]
    pids = stack_pids(where)
    assert set(pids) == {"s3", "mlflow", "ray"}
    for name, pid in pids.items():  # detached: they outlived the `up` process
        assert procs.alive(pid), name
        assert (where / "runs" / "stack" / f"{name}.pid").read_text().strip() == str(pid)
    status = orchestrator("stack", "status", cwd=where, env=env)
    assert status.returncode == 0 and states(status.stdout) == {"s3": "up", "mlflow": "up", "ray": "up"}, status.stdout

    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow_port']}"
    assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3_port']}"
    assert exports["RAY_ADDRESS"] == f"127.0.0.1:{ports['ray_port']}" and procs.port_open(ports["ray_port"])
    token_file = Path(exports["RAY_AUTH_TOKEN_PATH"])
    assert token_file.stat().st_mode & 0o077 == 0  # readable by the owner only
    assert stack["token"] not in stack["up"].stdout + stack["up"].stderr  # the token is never printed
    assert (where / "runs" / "stack" / "env.sh").read_text().count("export ") == len(exports)
    s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name=exports["AWS_DEFAULT_REGION"],
                      aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
    assert BUCKET in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    denied = subprocess.run([str(BIN / "ray"), "job", "list"], cwd=where, capture_output=True, text=True, timeout=60,
                            env={**env, "RAY_API_SERVER_ADDRESS": exports["RAY_API_SERVER_ADDRESS"], "HOME": str(where)})
    assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()

    again = orchestrator("stack", "up", cwd=where, env=env)
    assert again.returncode == 0 and again.stdout.count("already running") == 3, again.stdout + again.stderr
    assert stack_pids(where) == pids

    client = MlflowClient(stack["mlflow"])
    run = client.create_run(client.create_experiment("stack-check"))
    note = where / "note.txt"
    note.write_text("stored through the MLflow artifact proxy")
    client.log_artifact(run.info.run_id, str(note))
    for name in ("mlflow", "s3"):
        assert stop_service(Stack(where / "runs" / "stack"), name)
    restarted = orchestrator("stack", "up", cwd=where, env=env)
    assert restarted.returncode == 0 and restarted.stdout.count("already running") == 1, restarted.stderr
    assert stack_pids(where)["ray"] == pids["ray"]
    fetched = Path(client.download_artifacts(run.info.run_id, "note.txt", str(where / "fetched")))
    assert fetched.read_text() == "stored through the MLflow artifact proxy"
    assert BUCKET in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_a_training_job_and_a_sweep_job_side_by_side_reach_mlflow_and_the_bucket(stack, jobs, aws, tmp_path):
    """Two jobs on the cluster at once, as a team's: a training job submitted through the jobs API
    and a sweep job through ``ray job submit``; each one's runs, files and records are its own."""
    storage = f"s3://{BUCKET}/train"
    entrypoint = ("python -m orchestrator train model=cls-n.yaml data=digits epochs=2 imgsz=16 fraction=0.1 "
                  f"log_every_n_steps=1 num_workers=1 verbose=false storage={storage}")  # MLflow: the head's env
    training = jobs.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}})
    check_sweep_job(stack, aws, tmp_path)
    check_training_job(stack, jobs, aws, training, storage)


def check_training_job(stack, jobs, aws, submission_id: str, storage: str) -> None:
    from mlflow.tracking import MlflowClient

    from callbacks.sinks import read_event_log

    status = wait_for(jobs, submission_id)
    assert status == "SUCCEEDED", job_failure(jobs, submission_id, status)
    logs = jobs.get_job_logs(submission_id)
    assert "metrics/accuracy_top1" in logs  # the summary table

    client = MlflowClient(stack["mlflow"])
    experiment = client.get_experiment_by_name("classify")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.ray_job_id = '{submission_id}'")
    assert len(runs) == 1, "one MLflow run, tagged with the job's submission id"
    run = runs[0]
    # the last lines point to the run's MLflow page, not to Ray's temporary working dir
    url = f"{stack['mlflow']}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    assert f"MLflow run: {url}" in logs.splitlines() and "run folder:" not in logs, logs[-2000:]
    assert run.info.status == "FINISHED"
    assert run.data.params["num_workers"] == "1" and run.data.params["storage"] == storage
    assert run.data.params["tracking_uri"] == stack["mlflow"]
    assert run.data.params["s3_endpoint"] == stack["exports"]["AWS_ENDPOINT_URL"]
    note = run.data.tags["mlflow.note.content"]
    assert "cls-n.yaml" in note and "digits" in note and "world size: 1" in note and "epochs: 2" in note
    epochs = client.get_metric_history(run.info.run_id, "metrics/accuracy_top1")
    assert sorted(m.step for m in epochs) == [0, 1]
    steps = client.get_metric_history(run.info.run_id, "step/train/loss")
    # one point per batch at the optimizer step reached (nbs=64, batch=16: 4 batches per step)
    by_time = [m.step for m in sorted(steps, key=lambda m: m.timestamp)]
    assert len(steps) >= 2 and by_time == sorted(by_time) and by_time[-1] >= 1
    assert "final/metrics/accuracy_top1" in run.data.metrics
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"args.yaml", "results.csv", "results.png", "weights/best.pt"} <= artifacts
    assert any(a.startswith("events/") for a in artifacts)
    # MLflow's artifacts live on disk beside its database (the server proxies them), not in moto's memory
    on_disk = stack["where"] / "runs" / "stack" / "mlartifacts"
    assert list(on_disk.rglob(f"{run.info.run_id}/artifacts/weights/best.pt"))

    run_id = run.data.tags["orchestrator.run_id"]
    keys = keys_under(aws, "train/")
    assert f"train/runs/{run_id}/weights/best.pt" in keys and f"train/runs/{run_id}/weights/last.pt" in keys
    assert any(k.startswith("train/ray/") and k.endswith("/last.pt") for k in keys), "Ray Train checkpoints"
    events = read_event_log(storage, run_id).to_pylist()
    epoch_ends = sorted(r["epoch"] for r in events if r["event"] == "on_fit_epoch_end" and not r["final_eval"])
    assert epoch_ends == [0, 1]
    assert {r["rank"] for r in events} == {0}


def check_sweep_job(stack, aws, tmp_path) -> None:
    """A sweep submitted with the ``ray job submit`` CLI and the stack's token environment."""
    from mlflow.tracking import MlflowClient

    storage = f"s3://{BUCKET}/sweep"
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "base": {"model": "cls-n.yaml", "data": "digits", "epochs": 2, "imgsz": 16, "fraction": 0.1,
                 "batch": 16, "optimizer": "SGD", "verbose": False, "project": "tiny-sweep"},
        "space": {"lr0": {"grid": [0.02]}},  # one trial: the path, not the search (tests/test_sweeps.py)
        "name": "tiny", "search": "grid", "num_samples": 1, "max_concurrent": 1, "scheduler": "fifo"}))
    env = {**stack["env"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": stack["exports"]["RAY_AUTH_TOKEN_PATH"],
           "RAY_ADDRESS": stack["dashboard"]}
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps({"excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}}),
         "--", "python", "-m", "orchestrator", "sweep", str(sweep),
         f"tracking_uri={stack['mlflow']}", f"storage={storage}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    tail = "\n".join((submit.stdout + submit.stderr).splitlines()[-40:])
    assert submit.returncode == 0, f"ray job submit exited {submit.returncode}:\n{tail}"
    assert "succeeded" in submit.stdout.lower()

    client = MlflowClient(stack["mlflow"])
    experiment = client.get_experiment_by_name("tiny-sweep")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`sweep.role` = 'parent'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "best_objective" in parent.data.metrics
    assert {"parallel_coordinates.png", "trials.csv", "best.yaml", "sweep.yaml"} <= artifact_paths(
        client, parent.info.run_id)
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.data.params["lr0"] for c in children] == ["0.02"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["best_mlflow_run_id"] in {c.info.run_id for c in children}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "metrics/accuracy_top1")
        assert sorted(m.step for m in history) == [0, 1]
        assert "world size: 1" in child.data.tags["mlflow.note.content"]

    keys = keys_under(aws, "sweep/")
    for child in children:
        run_id = child.data.tags["orchestrator.run_id"]
        assert any(k.startswith(f"sweep/events/run_id={run_id}/") for k in keys)
        assert f"sweep/runs/{run_id}/weights/best.pt" in keys
    assert any(k.startswith("sweep/ray/sweep-") for k in keys), "the Tune experiment is in the bucket"


# ------------------------------------------------------------------------ stops and a killed driver
def wait_run_of_job(client, submission_id: str, timeout: float = 300):
    """The MLflow run tagged with the job's submission id, once it has logged two epochs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("classify")
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.ray_job_id = '{submission_id}'") \
            if experiment else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "fitness")) >= 2:
            return runs[0]
        time.sleep(1)
    pytest.fail(f"job {submission_id}: no MLflow run with two epochs after {timeout:.0f} s")


def wait_ended(client, run_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    while (run := client.get_run(run_id)).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
    return run


def assert_each_once(client, run, storage: str) -> None:
    """Every logged epoch once in MLflow; the event log holds each stream's records from seq 0
    without a gap or a duplicate (counted raw)."""
    from callbacks.sinks import read_event_log

    steps = sorted(point.step for point in client.get_metric_history(run.info.run_id, "fitness"))
    assert steps == list(range(len(steps))) and len(steps) >= 2
    raw = read_event_log(storage, run.data.tags["orchestrator.run_id"], dedup_rows=False).to_pylist()
    streams: dict[tuple, list[int]] = {}
    for row in raw:
        streams.setdefault((row["rank"], row["attempt"]), []).append(row["seq"])
    assert streams and all(sorted(seqs) == list(range(len(seqs))) for seqs in streams.values())


def test_job_stop_and_a_killed_driver_end_their_runs_killed(stack, jobs, aws):
    """``ray job stop`` (SIGTERM, 3 s before Ray's SIGKILL) ends the run KILLED with the signal as
    its reason; a driver killed with SIGKILL while Ray stays up has its run ended KILLED by its
    callback actor once Ray marks the driver's job ended (within 60 s, the issue's bound). Both keep
    every epoch once and every record once."""
    from mlflow.tracking import MlflowClient

    storage = f"s3://{BUCKET}/faults"
    entrypoint = ("python -m orchestrator train model=cls-n.yaml data=digits epochs=60 imgsz=16 fraction=0.5 "
                  f"num_workers=1 verbose=false tracking_uri={stack['mlflow']} storage={storage}")
    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}}
    stopped = jobs.submit_job(entrypoint=f"{entrypoint} name=stopped", runtime_env=runtime_env)
    killed = jobs.submit_job(entrypoint=f"{entrypoint} name=killed", runtime_env=runtime_env)
    client = MlflowClient(stack["mlflow"])
    runs = {job: wait_run_of_job(client, job) for job in (stopped, killed)}

    jobs.stop_job(stopped)
    os.kill(int(jobs.get_job_info(killed).driver_info.pid), signal.SIGKILL)
    start = time.monotonic()
    ended = wait_ended(client, runs[killed].info.run_id, timeout=90)
    took = time.monotonic() - start
    assert ended.info.status == "KILLED" and took <= 60, f"{ended.info.status} after {took:.0f} s"
    assert "driver was lost (its Ray job ended)" in ended.data.tags["orchestrator.end_reason"]
    print(f"the killed driver's run ended {took:.1f} s after the kill")
    assert_each_once(client, ended, storage)

    ended = wait_ended(client, runs[stopped].info.run_id, timeout=30)
    assert ended.info.status == "KILLED" and ended.data.tags["orchestrator.end_reason"] == "stopped by SIGTERM"
    assert wait_for(jobs, stopped) == "STOPPED"
    assert_each_once(client, ended, storage)
