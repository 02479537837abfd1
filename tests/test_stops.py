"""SIGTERM/SIGINT to a training driver: the run stops at an optimizer step with a mid-epoch last.pt,
flushes, ends KILLED with the signal as its reason, and ``resume=True`` continues from that batch,
into the same MLflow run and run id."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from callbacks.sinks import read_event_log

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["model=cls-n.yaml", "data=digits", "imgsz=16", "fraction=0.5", "verbose=False", "plots=False"]


def start_training(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *QUICK, *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_epochs(proc: subprocess.Popen, results: Path, epochs: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (results.is_file() and len(results.read_text().splitlines()) > epochs):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training ended or stalled before epoch {epochs}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)


def mlflow_runs(cwd: Path, experiment: str = "classify"):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=["start_time ASC"])
    return client, runs


@pytest.mark.parametrize("workers,epochs", [(0, 6), (2, 10)], ids=["in-process", "ray-2-workers"])
def test_sigterm_stops_at_a_step_and_resume_continues(tmp_path, workers, epochs):
    """In process, and on two Ray Train workers (the driver passes the stop to them through the
    callback actor; they vote on it at an optimizer step)."""
    proc = start_training(tmp_path, f"epochs={epochs}", f"num_workers={workers}")
    results = tmp_path / "runs" / "classify" / "train" / "results.csv"
    wait_for_epochs(proc, results, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == ("stopped by SIGTERM: the run ended KILLED; resume=True continues "
                                            "from its last checkpoint")
    client, runs = mlflow_runs(tmp_path)
    run = runs[0]
    assert run.info.status == "KILLED" and run.data.tags["orchestrator.end_reason"] == "stopped by SIGTERM"
    fitness = sorted(point.step for point in client.get_metric_history(run.info.run_id, "fitness"))
    assert fitness == list(range(len(fitness))) and len(fitness) >= 2  # each finished epoch once
    finished = next((tmp_path / "runs" / "journal").iterdir()) / "finished.json"
    assert '"status": "KILLED"' in finished.read_text() and '"delivered": true' in finished.read_text()
    last = torch.load(tmp_path / "runs" / "classify" / "train" / "weights" / "last.pt", weights_only=True)
    stopped_at = last["epoch"]  # the stop never cuts a checkpoint short: it loads
    assert last["position"]["batch"] >= 1  # saved at the optimizer step where it stopped, mid-epoch
    assert stopped_at + 1 < epochs

    resumed = subprocess.run([sys.executable, "-m", "orchestrator", "train", "resume=True"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from epoch {stopped_at + 1} of {epochs}, batch {last['position']['batch'] + 1} of " in resumed.stderr
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # the same MLflow run, continued
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "fitness")]  # raw
    assert client.get_run(run.info.run_id).info.status == "FINISHED" and sorted(steps) == list(range(epochs))
    table = read_event_log(str(tmp_path / "runs" / "store"), run.data.tags["orchestrator.run_id"], dedup_rows=False)
    assert_each_batch_once(table.to_pylist(), ranks=list(range(workers)) or [-1], epochs=epochs)


def assert_each_batch_once(rows: list[dict], ranks: list[int], epochs: int) -> None:
    """Each rank's rows (in process the trainer's rank is -1): two sessions (attempts), each a gapless sequence from 0; every training
    batch's end once, the steps 1..N (no batch lost or trained twice), N = epochs x the batches
    an epoch has (the first epoch's end says how many)."""
    streams: dict[tuple, list[int]] = {}
    for row in rows:
        streams.setdefault((row["rank"], row["attempt"]), []).append(row["seq"])
    assert sorted(rank for rank, _ in streams) == sorted(ranks * 2)
    assert all(sorted(seqs) == list(range(len(seqs))) for seqs in streams.values())
    for rank in ranks:
        mine = [row for row in rows if row["rank"] == rank]
        batches = sorted(row["step"] for row in mine if row["event"] == "on_train_batch_end")
        ends = sorted(row["step"] for row in mine if row["event"] == "on_fit_epoch_end" and not row["final_eval"])
        assert ends == [ends[0] * (e + 1) for e in range(epochs)]
        assert batches == list(range(1, ends[-1] + 1))


def test_a_failing_run_ends_failed_with_its_reason_and_files(tmp_path, monkeypatch):
    """A run that raises in epoch 2 ends FAILED with the error's line as its reason, and MLflow has
    args.yaml and results.csv as the failure left them (two epochs)."""
    from orchestrator import Model
    from tests.helpers import artifact_paths

    monkeypatch.chdir(tmp_path)

    def explode(trainer):
        if trainer.epoch == 2:
            raise RuntimeError("disk on fire")

    model = Model("cls-n.yaml")
    model.add_callback("on_train_batch_end", explode)
    with pytest.raises(Exception, match="disk on fire"):
        model.train(data="digits", imgsz=16, fraction=0.05, epochs=4, verbose=False, plots=False)
    client, runs = mlflow_runs(tmp_path)
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["orchestrator.end_reason"].endswith("RuntimeError: disk on fire")
    assert {"args.yaml", "results.csv"} <= set(artifact_paths(client, run.info.run_id))
    csv = Path(client.download_artifacts(run.info.run_id, "results.csv", str(tmp_path / "dl"))).read_text()
    assert len(csv.strip().splitlines()) == 3  # the header and epochs 0 and 1


def test_a_stop_outranks_a_preemption_and_the_wait_fits_a_ray_jobs_grace(monkeypatch):
    """The step vote answers the highest notice (a rank that heard a stop and one that heard a
    preemption both stop); under ``ray job submit`` the driver waits Ray's stop grace less the time
    kept for closing the sinks."""
    from orchestrator.stops import FINISH_TIME, STOP_WAIT, stop_grace
    from trainers.engine.preemption import PREEMPTED, STOPPED, StepVote

    device = torch.device("cpu")
    assert [StepVote(notice, device, 1)() for notice in (None, lambda: False, lambda: True, lambda: STOPPED)] \
        == [0, 0, PREEMPTED, STOPPED]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert stop_grace() == STOP_WAIT
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)
    assert stop_grace() == 3.0 - FINISH_TIME
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "20")
    assert stop_grace() == 20.0 - FINISH_TIME
